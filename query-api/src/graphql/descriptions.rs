//! Every type, field, argument and enum value of the schema says what it is: codegen tools,
//! GraphiQL and the dashboards' authors read the schema, not our code. The test introspects
//! the built schema, as those tools do, and names everything left undescribed.

use serde_json::Value;

use super::{Limits, build_schema};

/// What GraphQL itself defines (introspection types, the built-in scalars): not ours to
/// describe.
fn is_built_in(type_name: &str) -> bool {
    type_name.starts_with("__") || ["String", "Int", "Float", "Boolean", "ID"].contains(&type_name)
}

const INTROSPECTION: &str = "{ __schema { types {
    name description
    fields(includeDeprecated: true) { name description args { name description } }
    inputFields { name description }
    enumValues(includeDeprecated: true) { name description }
} } }";

fn undescribed(value: &Value) -> bool {
    value["description"].as_str().is_none_or(|text| text.trim().is_empty())
}

fn items(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

/// `Type`, `Type.field`, `Type.field(argument)`, `Input.field` and `Enum.VALUE` for everything
/// in the schema without a description.
pub(crate) fn undescribed_members(introspection: &Value) -> Vec<String> {
    let mut missing = Vec::new();
    for ty in items(&introspection["__schema"]["types"]) {
        let name = ty["name"].as_str().unwrap_or_default();
        if is_built_in(name) {
            continue;
        }
        if undescribed(ty) {
            missing.push(name.to_owned());
        }
        for field in items(&ty["fields"]) {
            let field_name = field["name"].as_str().unwrap_or_default();
            if undescribed(field) {
                missing.push(format!("{name}.{field_name}"));
            }
            for arg in items(&field["args"]) {
                if undescribed(arg) {
                    missing.push(format!(
                        "{name}.{field_name}({})",
                        arg["name"].as_str().unwrap_or_default()
                    ));
                }
            }
        }
        for member in items(&ty["inputFields"]).iter().chain(items(&ty["enumValues"])) {
            if undescribed(member) {
                missing.push(format!("{name}.{}", member["name"].as_str().unwrap_or_default()));
            }
        }
    }
    missing
}

#[tokio::test]
async fn every_type_field_argument_and_enum_value_is_described() {
    let schema = build_schema(&Limits::default(), true);
    let response = schema.execute(INTROSPECTION).await;
    assert!(response.errors.is_empty(), "{:?}", response.errors);
    let introspection = response.data.into_json().unwrap();
    assert!(
        items(&introspection["__schema"]["types"]).len() > 20,
        "the introspection found too few types: {introspection}"
    );
    let missing = undescribed_members(&introspection);
    assert!(
        missing.is_empty(),
        "{} members of the schema have no description:\n  {}",
        missing.len(),
        missing.join("\n  ")
    );
}

#[test]
fn an_undescribed_member_is_named() {
    let introspection = serde_json::json!({ "__schema": { "types": [
        { "name": "__Type", "description": null, "fields": [] },
        { "name": "Thing", "description": "A thing.", "fields": [
            { "name": "size", "description": " ", "args": [{ "name": "unit", "description": null }] },
        ], "inputFields": null, "enumValues": null },
        { "name": "Colour", "description": null, "fields": null, "inputFields": null,
          "enumValues": [{ "name": "RED", "description": "Red." }, { "name": "BLUE", "description": null }] },
    ] } });
    assert_eq!(
        undescribed_members(&introspection),
        ["Thing.size", "Thing.size(unit)", "Colour", "Colour.BLUE"]
    );
}
