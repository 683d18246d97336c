//! Positions: read-your-writes between the command API and the dashboards. A command's
//! answer carries the log `position` of its events; a dashboard that must show them passes it
//! back, in the `X-Min-Position` header or a root field's `minPosition` argument, and is
//! answered from a source whose projections have applied it (the waiting for one is
//! [`ReadSources::route`]'s). Every answer says in `X-Read-Position` the position it reflects
//! at least.
//!
//! [`ReadSources::route`]: crate::sources::ReadSources::route

use async_graphql::Name;
use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, Selection, SelectionSet};
use async_graphql_value::Value;
use axum::http::{HeaderMap, HeaderValue};

use crate::sources::Route;

/// The header a caller names the position it must read at with.
pub(crate) const MIN_POSITION_HEADER: &str = "x-min-position";
/// The header an answer names the position it reflects at least with.
pub(crate) const READ_POSITION_HEADER: &str = "x-read-position";

/// The `X-Min-Position` header: a position the answer must include (a command's `position`).
pub(crate) fn min_position_header(headers: &HeaderMap) -> Result<Option<i64>, &'static str> {
    match headers.get(MIN_POSITION_HEADER) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|p| *p >= 0)
            .map(Some)
            .ok_or("X-Min-Position must be a non-negative integer (a command's `position`)"),
    }
}

/// The position the caller wants to read at: the `X-Min-Position` header or the largest
/// `minPosition` argument of the operation's root fields.
pub(crate) fn min_position(
    headers: &HeaderMap,
    document: &ExecutableDocument,
    operation_name: Option<&str>,
    variables: &serde_json::Value,
) -> Result<Option<i64>, String> {
    let header = min_position_header(headers)?;
    let argument = min_position_argument(document, operation_name, variables)?;
    Ok(header.max(argument))
}

/// The position an answer read on `route` reflects at least: the source had applied this
/// much before the query read it (none when the source's checkpoints are unknown).
pub(crate) fn read_position(route: &Route) -> Option<i64> {
    route.checkpoints.as_ref().map(crate::sources::Checkpoints::least)
}

/// Tells the caller, in `X-Read-Position`, the position its answer reflects at least.
pub(crate) fn tell_read_position(headers: &mut HeaderMap, position: Option<i64>) {
    if let Some(position) = position
        && let Ok(value) = HeaderValue::from_str(&position.to_string())
    {
        headers.insert(READ_POSITION_HEADER, value);
    }
}

/// The largest `minPosition` argument among the root fields of the operation that will run
/// (read before execution, since the position decides which source answers).
pub fn min_position_argument(
    document: &ExecutableDocument,
    operation_name: Option<&str>,
    variables: &serde_json::Value,
) -> Result<Option<i64>, String> {
    let operation = match (&document.operations, operation_name) {
        (DocumentOperations::Single(operation), _) => operation,
        (DocumentOperations::Multiple(operations), Some(name)) => match operations.get(&Name::new(name)) {
            Some(operation) => operation,
            None => return Ok(None),
        },
        (DocumentOperations::Multiple(_), None) => return Ok(None),
    };
    let defaults: std::collections::HashMap<&str, &async_graphql::Value> = operation
        .node
        .variable_definitions
        .iter()
        .filter_map(|v| {
            v.node
                .default_value
                .as_ref()
                .map(|d| (v.node.name.node.as_str(), &d.node))
        })
        .collect();
    let position = |value: &Value| -> Result<Option<i64>, String> {
        let json = match value {
            Value::Variable(name) => match variables.get(name.as_str()) {
                Some(json) => json.clone(),
                None => match defaults.get(name.as_str()) {
                    Some(default) => (*default).clone().into_json().map_err(|e| e.to_string())?,
                    None => return Ok(None),
                },
            },
            other => other.clone().into_const().map_or(serde_json::Value::Null, |v| {
                v.into_json().unwrap_or(serde_json::Value::Null)
            }),
        };
        match json {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::Number(n) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| format!("minPosition {n} is not a 64-bit integer")),
            serde_json::Value::String(s) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| format!("minPosition `{s}` is not a 64-bit integer")),
            other => Err(format!("minPosition {other} is not a 64-bit integer")),
        }
    };
    fn walk(
        set: &SelectionSet,
        document: &ExecutableDocument,
        depth: usize,
        position: &dyn Fn(&Value) -> Result<Option<i64>, String>,
    ) -> Result<Option<i64>, String> {
        let mut largest = None;
        if depth > 8 {
            return Ok(None);
        }
        for item in &set.items {
            let found = match &item.node {
                Selection::Field(field) => {
                    let mut found = None;
                    for (name, value) in &field.node.arguments {
                        if name.node.as_str() == "minPosition" {
                            found = found.max(position(&value.node)?);
                        }
                    }
                    found
                }
                Selection::InlineFragment(fragment) => {
                    walk(&fragment.node.selection_set.node, document, depth + 1, position)?
                }
                Selection::FragmentSpread(spread) => match document.fragments.get(&spread.node.fragment_name.node) {
                    Some(fragment) => walk(&fragment.node.selection_set.node, document, depth + 1, position)?,
                    None => None,
                },
            };
            largest = largest.max(found);
        }
        Ok(largest)
    }
    walk(&operation.node.selection_set.node, document, 0, &position)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_min_position_header_is_a_non_negative_integer() {
        let mut headers = HeaderMap::new();
        assert_eq!(min_position_header(&headers), Ok(None));
        headers.insert(MIN_POSITION_HEADER, HeaderValue::from_static(" 42 "));
        assert_eq!(min_position_header(&headers), Ok(Some(42)));
        for bad in ["-1", "soon", "4.2"] {
            headers.insert(MIN_POSITION_HEADER, HeaderValue::from_static(bad));
            assert!(min_position_header(&headers).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_larger_of_header_and_argument_wins() {
        let document = async_graphql::parser::parse_query("{ devices(minPosition: 7) { totalCount } }").unwrap();
        let vars = serde_json::json!({});
        let mut headers = HeaderMap::new();
        assert_eq!(min_position(&headers, &document, None, &vars), Ok(Some(7)));
        headers.insert(MIN_POSITION_HEADER, HeaderValue::from_static("9"));
        assert_eq!(min_position(&headers, &document, None, &vars), Ok(Some(9)));
        headers.insert(MIN_POSITION_HEADER, HeaderValue::from_static("3"));
        assert_eq!(min_position(&headers, &document, None, &vars), Ok(Some(7)));
    }
    fn min_position_argument(
        query: &str,
        operation_name: Option<&str>,
        variables: &serde_json::Value,
    ) -> Result<Option<i64>, String> {
        let document = async_graphql::parser::parse_query(query).unwrap();
        super::min_position_argument(&document, operation_name, variables)
    }

    #[test]
    fn min_position_comes_from_literals_variables_and_defaults() {
        let vars = serde_json::json!({"p": "42"});
        assert_eq!(
            min_position_argument("{ devices(minPosition: 7) { totalCount } }", None, &vars),
            Ok(Some(7))
        );
        assert_eq!(
            min_position_argument(
                "query($p: BigInt) { a: device(id: \"x\", minPosition: $p) { id } b: devices(minPosition: \"9\") { totalCount } }",
                None,
                &vars
            ),
            Ok(Some(42))
        );
        assert_eq!(
            min_position_argument(
                "query($q: BigInt = 5) { devices(minPosition: $q) { totalCount } }",
                None,
                &vars
            ),
            Ok(Some(5))
        );
        assert_eq!(
            min_position_argument(
                "{ ... on Query { devices(minPosition: 3) { totalCount } } }",
                None,
                &vars
            ),
            Ok(Some(3))
        );
        assert_eq!(
            min_position_argument("{ devices { totalCount } }", None, &vars),
            Ok(None)
        );
        assert!(min_position_argument("{ devices(minPosition: \"soon\") { totalCount } }", None, &vars).is_err());
        // Of several operations, the one named runs.
        let two =
            "query A { devices(minPosition: 1) { totalCount } } query B { devices(minPosition: 2) { totalCount } }";
        assert_eq!(min_position_argument(two, Some("B"), &vars), Ok(Some(2)));
    }
}
