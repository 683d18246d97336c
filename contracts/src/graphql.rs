//! Breaking changes between two GraphQL schemas (SDL, as `Schema::sdl()` prints it).
//!
//! Outputs (object and interface fields) may only get stricter: a field removed, or a
//! non-null one made nullable, breaks clients that read it. Inputs (arguments, input object
//! fields) may only get looser: one removed, a nullable one made required, or a new required
//! one breaks clients that send the old shape. Removed types, enum values and union members
//! break clients that name them.

use std::collections::BTreeMap;

use async_graphql_parser::Positioned;
use async_graphql_parser::parse_schema;
use async_graphql_parser::types::{
    BaseType, FieldDefinition, InputValueDefinition, Type, TypeKind, TypeSystemDefinition,
};

use crate::{Breaking, ContractError};

/// Every breaking change from `old` to `new`, sorted.
pub fn breaking_changes(old: &str, new: &str) -> Result<Vec<Breaking>, ContractError> {
    let old_types = types(old)?;
    let new_types = types(new)?;
    let mut changes = Vec::new();
    let mut breaking = |line: String| changes.push(Breaking(format!("graphql: {line}")));
    for (name, old_kind) in &old_types {
        let Some(new_kind) = new_types.get(name) else {
            breaking(format!("removed type {name}"));
            continue;
        };
        match (old_kind, new_kind) {
            (TypeKind::Scalar, TypeKind::Scalar) => {}
            (TypeKind::Object(old), TypeKind::Object(new)) => {
                removed_names(&old.implements, &new.implements, |i| {
                    breaking(format!("type {name} no longer implements {i}"));
                });
                output_fields(name, &old.fields, &new.fields, &mut breaking);
            }
            (TypeKind::Interface(old), TypeKind::Interface(new)) => {
                output_fields(name, &old.fields, &new.fields, &mut breaking);
            }
            (TypeKind::Union(old), TypeKind::Union(new)) => {
                removed_names(&old.members, &new.members, |member| {
                    breaking(format!("removed member {member} of union {name}"));
                });
            }
            (TypeKind::Enum(old), TypeKind::Enum(new)) => {
                let new_values: Vec<&str> = new.values.iter().map(|v| v.node.value.node.as_str()).collect();
                for value in &old.values {
                    let value = value.node.value.node.as_str();
                    if !new_values.contains(&value) {
                        breaking(format!("removed enum value {name}.{value}"));
                    }
                }
            }
            (TypeKind::InputObject(old), TypeKind::InputObject(new)) => {
                inputs(&format!("input field {name}"), &old.fields, &new.fields, &mut breaking);
            }
            _ => breaking(format!("type {name} changed kind")),
        }
    }
    changes.sort();
    changes.dedup();
    Ok(changes)
}

/// The named types of a schema (extensions merged into their type would complicate this;
/// `Schema::sdl()` prints none).
fn types(sdl: &str) -> Result<BTreeMap<String, TypeKind>, ContractError> {
    let document = parse_schema(sdl)?;
    Ok(document
        .definitions
        .into_iter()
        .filter_map(|definition| match definition {
            TypeSystemDefinition::Type(ty) => Some((ty.node.name.node.to_string(), ty.node.kind)),
            _ => None,
        })
        .collect())
}

fn removed_names<T: AsRef<str>>(old: &[Positioned<T>], new: &[Positioned<T>], mut removed: impl FnMut(&str)) {
    for name in old {
        if !new.iter().any(|n| n.node.as_ref() == name.node.as_ref()) {
            removed(name.node.as_ref());
        }
    }
}

fn output_fields(
    owner: &str,
    old: &[Positioned<FieldDefinition>],
    new: &[Positioned<FieldDefinition>],
    breaking: &mut impl FnMut(String),
) {
    for old_field in old {
        let field = old_field.node.name.node.as_str();
        let Some(new_field) = new.iter().find(|f| f.node.name.node == field) else {
            breaking(format!("removed field {owner}.{field}"));
            continue;
        };
        let (old_ty, new_ty) = (&old_field.node.ty.node, &new_field.node.ty.node);
        if !output_compatible(old_ty, new_ty) {
            breaking(format!("field {owner}.{field} changed type from {old_ty} to {new_ty}"));
        }
        inputs(
            &format!("argument {owner}.{field}"),
            &old_field.node.arguments,
            &new_field.node.arguments,
            breaking,
        );
    }
}

/// Arguments of a field or fields of an input object, named `{what}({name})`.
fn inputs(
    what: &str,
    old: &[Positioned<InputValueDefinition>],
    new: &[Positioned<InputValueDefinition>],
    breaking: &mut impl FnMut(String),
) {
    for old_input in old {
        let name = old_input.node.name.node.as_str();
        match new.iter().find(|i| i.node.name.node == name) {
            None => breaking(format!("removed {what}({name})")),
            Some(new_input) => {
                let (old_ty, new_ty) = (&old_input.node.ty.node, &new_input.node.ty.node);
                if !input_compatible(old_ty, new_ty) {
                    breaking(format!("{what}({name}) changed type from {old_ty} to {new_ty}"));
                }
            }
        }
    }
    for new_input in new {
        let name = new_input.node.name.node.as_str();
        let required = !new_input.node.ty.node.nullable && new_input.node.default_value.is_none();
        if required && !old.iter().any(|i| i.node.name.node == name) {
            breaking(format!("added required {what}({name})"));
        }
    }
}

/// Whether every value of `new` is a value a reader of `old` understands.
fn output_compatible(old: &Type, new: &Type) -> bool {
    (old.nullable || !new.nullable) && same_base(&old.base, &new.base, output_compatible)
}

/// Whether every value a client sent for `old` is still accepted by `new`.
fn input_compatible(old: &Type, new: &Type) -> bool {
    (new.nullable || !old.nullable) && same_base(&old.base, &new.base, input_compatible)
}

fn same_base(old: &BaseType, new: &BaseType, items: fn(&Type, &Type) -> bool) -> bool {
    match (old, new) {
        (BaseType::Named(old), BaseType::Named(new)) => old == new,
        (BaseType::List(old), BaseType::List(new)) => items(old, new),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        type Query { device(id: ID!, at: Int): Device, devices(first: Int): [Device!]! }
        type Device implements Node { id: ID!, status: Status!, name: String }
        interface Node { id: ID! }
        enum Status { RUNNING STOPPED }
        union Thing = Device | Other
        type Other { x: Int }
        input Filter { status: Status, owner: ID! }
        schema { query: Query }
    "#;

    fn changes(new: &str) -> Vec<String> {
        breaking_changes(BASE, new).unwrap().into_iter().map(|b| b.0).collect()
    }

    #[test]
    fn the_same_schema_breaks_nothing() {
        assert!(changes(BASE).is_empty());
    }

    #[test]
    fn a_removed_field_breaks_readers() {
        let new = BASE.replace(", name: String }", " }");
        assert_eq!(changes(&new), ["graphql: removed field Device.name"]);
    }

    #[test]
    fn an_added_field_type_or_enum_value_breaks_nobody() {
        let new = BASE
            .replace(", name: String }", ", name: String, cores: Int! }")
            .replace("RUNNING STOPPED", "RUNNING STOPPED FAILED")
            .replace("type Other {", "type Extra { y: Int } type Other {")
            .replace(
                "input Filter { status: Status,",
                "input Filter { tier: String, status: Status,",
            );
        assert!(changes(&new).is_empty(), "{:?}", changes(&new));
    }

    #[test]
    fn an_output_made_nullable_breaks_and_one_made_non_null_does_not() {
        let new = BASE
            .replace("status: Status!", "status: Status")
            .replace("name: String", "name: String!");
        assert_eq!(
            changes(&new),
            ["graphql: field Device.status changed type from Status! to Status"]
        );
        let list = BASE.replace("[Device!]!", "[Device]!");
        assert_eq!(
            changes(&list),
            ["graphql: field Query.devices changed type from [Device!]! to [Device]!"]
        );
    }

    #[test]
    fn an_input_made_required_breaks_and_one_made_optional_does_not() {
        let new = BASE.replace("at: Int", "at: Int!").replace("owner: ID!", "owner: ID");
        assert_eq!(
            changes(&new),
            ["graphql: argument Query.device(at) changed type from Int to Int!"]
        );
        let input = BASE.replace("status: Status, owner", "status: Status!, owner");
        assert_eq!(
            changes(&input),
            ["graphql: input field Filter(status) changed type from Status to Status!"]
        );
    }

    #[test]
    fn a_new_required_argument_breaks_and_one_with_a_default_does_not() {
        let required = BASE.replace("devices(first: Int)", "devices(first: Int, owner: ID!)");
        assert_eq!(
            changes(&required),
            ["graphql: added required argument Query.devices(owner)"]
        );
        let defaulted = BASE.replace("devices(first: Int)", "devices(first: Int, limit: Int! = 10)");
        assert!(changes(&defaulted).is_empty());
    }

    #[test]
    fn removals_of_types_values_members_and_arguments_break() {
        let new = BASE
            .replace("RUNNING STOPPED", "RUNNING")
            .replace("Device | Other", "Device")
            .replace("type Other { x: Int }", "")
            .replace("device(id: ID!, at: Int)", "device(id: ID!)")
            .replace("implements Node ", "");
        assert_eq!(
            changes(&new),
            [
                "graphql: removed argument Query.device(at)",
                "graphql: removed enum value Status.STOPPED",
                "graphql: removed member Other of union Thing",
                "graphql: removed type Other",
                "graphql: type Device no longer implements Node",
            ]
        );
    }

    #[test]
    fn a_type_of_another_kind_breaks() {
        let new = BASE.replace("enum Status { RUNNING STOPPED }", "scalar Status");
        assert_eq!(changes(&new), ["graphql: type Status changed kind"]);
    }

    #[test]
    fn a_schema_that_does_not_parse_is_an_error() {
        assert!(breaking_changes(BASE, "type {").is_err());
    }
}
