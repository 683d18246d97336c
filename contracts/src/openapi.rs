//! Breaking changes between two OpenAPI 3.1 documents (as JSON).
//!
//! A client of the old document breaks when a path, operation or success response it uses
//! is gone; when a parameter it sends is gone or one it does not send became required; when
//! a request body accepts less (a property removed, one made required, an enum value or
//! `null` no longer accepted, a type changed); or when a response gives less (a property or
//! required response header removed, a property no longer always present, `null` where
//! there was none, an enum value or a type changed). Everything else (additions, new
//! statuses, descriptions, examples) is not breaking.

use serde_json::Value;

use crate::Breaking;

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "patch", "head", "options", "trace"];

/// How deep `$ref`s are followed: far enough for any real body, and a bound on a document
/// whose schemas refer to each other in a cycle.
const MAX_DEPTH: usize = 16;

/// Every breaking change from `old` to `new`, sorted; `api` names the document in each line.
pub fn breaking_changes(api: &str, old: &Value, new: &Value) -> Vec<Breaking> {
    let mut diff = Diff {
        api,
        old_doc: old,
        new_doc: new,
        changes: Vec::new(),
    };
    for (path, old_item) in entries(&old["paths"]) {
        let Some(new_item) = new["paths"].get(path.as_str()) else {
            diff.breaking(format!("removed path {path}"));
            continue;
        };
        for method in METHODS {
            let old_op = &old_item[method];
            if old_op.is_null() {
                continue;
            }
            let name = format!("{} {path}", method.to_uppercase());
            match &new_item[method] {
                Value::Null => diff.breaking(format!("removed operation {name}")),
                new_op => diff.operation(&name, old_op, new_op),
            }
        }
    }
    let mut changes = diff.changes;
    changes.sort();
    changes.dedup();
    changes
}

/// Which side of the wire a schema is on: inputs may only get looser, outputs stricter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

struct Diff<'a> {
    api: &'a str,
    old_doc: &'a Value,
    new_doc: &'a Value,
    changes: Vec<Breaking>,
}

impl<'a> Diff<'a> {
    fn breaking(&mut self, line: String) {
        self.changes.push(Breaking(format!("openapi {}: {line}", self.api)));
    }

    fn operation(&mut self, name: &str, old: &'a Value, new: &'a Value) {
        self.parameters(name, old, new);
        let old_body = &old["requestBody"]["content"]["application/json"]["schema"];
        let new_body = &new["requestBody"]["content"]["application/json"]["schema"];
        if !old_body.is_null() {
            if new_body.is_null() {
                self.breaking(format!("{name}: removed the JSON request body"));
            } else {
                self.schema(&format!("{name} request body"), Side::Request, old_body, new_body, 0);
            }
        }
        if new["requestBody"]["required"] == true && old["requestBody"]["required"] != true {
            self.breaking(format!("{name}: the request body became required"));
        }
        for (status, old_response) in entries(&old["responses"]) {
            let new_response = &new["responses"][status.as_str()];
            if new_response.is_null() {
                // Clients handle the success they were promised; an error status that goes
                // away is one fewer failure.
                if status.starts_with('2') {
                    self.breaking(format!("{name}: removed response {status}"));
                }
                continue;
            }
            self.response_headers(&format!("{name} {status}"), old_response, new_response);
            for (media, old_content) in entries(&old_response["content"]) {
                let new_schema = &new_response["content"][media.as_str()]["schema"];
                if new_schema.is_null() {
                    self.breaking(format!("{name} {status}: removed response content {media}"));
                } else {
                    let at = format!("{name} {status} response");
                    self.schema(&at, Side::Response, &old_content["schema"], new_schema, 0);
                }
            }
        }
    }

    fn parameters(&mut self, name: &str, old: &'a Value, new: &'a Value) {
        let list = |op: &'a Value| -> Vec<&'a Value> { op["parameters"].as_array().into_iter().flatten().collect() };
        let key = |p: &Value| {
            (
                p["in"].as_str().unwrap_or("").to_owned(),
                p["name"].as_str().unwrap_or("").to_lowercase(),
            )
        };
        let (old_params, new_params) = (list(old), list(new));
        for old_param in &old_params {
            let (place, param) = key(old_param);
            match new_params.iter().find(|p| key(p) == (place.clone(), param.clone())) {
                None => self.breaking(format!("{name}: removed {place} parameter {param}")),
                Some(new_param) => {
                    if new_param["required"] == true && old_param["required"] != true {
                        self.breaking(format!("{name}: {place} parameter {param} became required"));
                    }
                    let at = format!("{name} {place} parameter {param}");
                    self.schema(&at, Side::Request, &old_param["schema"], &new_param["schema"], 0);
                }
            }
        }
        for new_param in &new_params {
            let (place, param) = key(new_param);
            if new_param["required"] == true && !old_params.iter().any(|p| key(p) == (place.clone(), param.clone())) {
                self.breaking(format!("{name}: added required {place} parameter {param}"));
            }
        }
    }

    fn response_headers(&mut self, at: &str, old: &Value, new: &Value) {
        for (header, old_header) in entries(&old["headers"]) {
            let new_header = entries(&new["headers"])
                .find(|(n, _)| n.eq_ignore_ascii_case(header))
                .map(|(_, h)| h);
            let always = |h: Option<&Value>| h.is_some_and(|h| h["required"] == true);
            if always(Some(old_header)) && !always(new_header) {
                self.breaking(format!("{at}: response header {header} is no longer always sent"));
            }
        }
    }

    /// Compares the schemas at `at`, following `$ref`s into each document's components.
    fn schema(&mut self, at: &str, side: Side, old: &'a Value, new: &'a Value, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        let (old, new) = (resolve(self.old_doc, old), resolve(self.new_doc, new));
        let (old_null, new_null) = (accepts_null(self.old_doc, old), accepts_null(self.new_doc, new));
        match side {
            Side::Request if old_null && !new_null => self.breaking(format!("{at}: null no longer accepted")),
            Side::Response if new_null && !old_null => self.breaking(format!("{at}: may now be null")),
            _ => {}
        }
        let (old, new) = (non_null(self.old_doc, old), non_null(self.new_doc, new));
        let (old_types, new_types) = (types(old), types(new));
        if !old_types.is_empty() && !new_types.is_empty() && old_types != new_types {
            self.breaking(format!(
                "{at}: type changed from {} to {}",
                old_types.join("|"),
                new_types.join("|")
            ));
            return;
        }
        if let Some(old_values) = old["enum"].as_array() {
            let new_values = new["enum"].as_array();
            for value in old_values {
                if new_values.is_some_and(|values| !values.contains(value)) {
                    self.breaking(format!("{at}: removed enum value {value}"));
                }
            }
        }
        let required = |schema: &Value| -> Vec<String> {
            schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        };
        let (old_required, new_required) = (required(old), required(new));
        for (property, old_schema) in entries(&old["properties"]) {
            let Some(new_schema) = new["properties"].get(property.as_str()) else {
                self.breaking(format!("{at}: removed property {property}"));
                continue;
            };
            if side == Side::Response && old_required.contains(property) && !new_required.contains(property) {
                self.breaking(format!("{at}: property {property} is no longer always present"));
            }
            self.schema(&format!("{at}.{property}"), side, old_schema, new_schema, depth + 1);
        }
        if side == Side::Request {
            for property in new_required.iter().filter(|p| !old_required.contains(p)) {
                self.breaking(format!("{at}: property {property} became required"));
            }
        }
        if !old["items"].is_null() && !new["items"].is_null() {
            self.schema(&format!("{at}[]"), side, &old["items"], &new["items"], depth + 1);
        }
    }
}

/// The members of an object (none for anything else).
fn entries(value: &Value) -> impl Iterator<Item = (&String, &Value)> {
    value.as_object().into_iter().flatten()
}

/// The schema a `$ref` names (`#/components/schemas/Name`), or the schema itself.
fn resolve<'v>(doc: &'v Value, schema: &'v Value) -> &'v Value {
    let mut schema = schema;
    // A chain of references, bounded for the same reason as MAX_DEPTH.
    for _ in 0..MAX_DEPTH {
        match schema["$ref"].as_str().and_then(|r| r.strip_prefix('#')) {
            Some(pointer) => schema = doc.pointer(pointer).unwrap_or(&Value::Null),
            None => break,
        }
    }
    schema
}

/// Whether `null` is a value of the schema (`type: [.., "null"]`, or a `null` alternative).
fn accepts_null(doc: &Value, schema: &Value) -> bool {
    names_null(schema)
        || ["oneOf", "anyOf"].iter().any(|k| {
            schema[*k]
                .as_array()
                .into_iter()
                .flatten()
                .any(|alt| names_null(resolve(doc, alt)))
        })
}

/// Whether the schema's `type` is or includes `null`.
fn names_null(schema: &Value) -> bool {
    match &schema["type"] {
        Value::String(t) => t == "null",
        Value::Array(ts) => ts.iter().any(|t| t == "null"),
        _ => false,
    }
}

/// The schema without its `null` alternative: `oneOf: [{type: null}, X]` is X (what utoipa
/// writes for an optional reference).
fn non_null<'v>(doc: &'v Value, schema: &'v Value) -> &'v Value {
    for key in ["oneOf", "anyOf"] {
        if let Some(alternatives) = schema[key].as_array() {
            let rest: Vec<&Value> = alternatives
                .iter()
                .filter(|alt| {
                    let alt = resolve(doc, alt);
                    !(names_null(alt) && types(alt).is_empty())
                })
                .collect();
            if let [only] = rest.as_slice() {
                return resolve(doc, only);
            }
        }
    }
    schema
}

/// The schema's `type`s other than `null`, sorted.
fn types(schema: &Value) -> Vec<&str> {
    let mut types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    types.retain(|t| *t != "null");
    types.sort_unstable();
    types
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn base() -> Value {
        json!({
            "openapi": "3.1.0",
            "paths": {
                "/v1/devices": {
                    "post": {
                        "parameters": [
                            {"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string"}}
                        ],
                        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Create"}}}},
                        "responses": {
                            "201": {
                                "description": "Created",
                                "headers": {"Location": {"required": true, "schema": {"type": "string"}}},
                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}
                            },
                            "409": {"description": "Conflict"}
                        }
                    }
                },
                "/v1/devices/{id}": {"delete": {"responses": {"200": {"description": "Deleted"}}}}
            },
            "components": {"schemas": {
                "Create": {
                    "type": "object",
                    "required": ["provider"],
                    "properties": {
                        "provider": {"$ref": "#/components/schemas/Provider"},
                        "reason": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Reason"}]},
                        "cores": {"type": "integer"}
                    }
                },
                "Provider": {"type": "string", "enum": ["aws", "gcp"]},
                "Reason": {"type": "string", "enum": ["requested", "idle"]},
                "Accepted": {
                    "type": "object",
                    "required": ["id", "position"],
                    "properties": {"id": {"type": "string"}, "position": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}
                }
            }}
        })
    }

    fn changes(edit: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut new = base();
        edit(&mut new);
        breaking_changes("test", &base(), &new)
            .into_iter()
            .map(|b| b.0)
            .collect()
    }

    fn remove(value: &mut Value, pointer: &str) {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let key = key.replace("~1", "/").replace("~0", "~");
        let key = key.as_str();
        let parent = value.pointer_mut(parent).unwrap();
        match parent {
            Value::Object(map) => {
                map.remove(key);
            }
            Value::Array(items) => {
                items.remove(key.parse().unwrap());
            }
            _ => panic!("{pointer}"),
        }
    }

    #[test]
    fn the_same_document_breaks_nothing() {
        assert!(changes(|_| {}).is_empty());
    }

    #[test]
    fn a_removed_response_property_breaks_readers() {
        let found = changes(|doc| remove(doc, "/components/schemas/Accepted/properties/tags"));
        assert_eq!(
            found,
            ["openapi test: POST /v1/devices 201 response: removed property tags"]
        );
    }

    #[test]
    fn additions_break_nobody() {
        let found = changes(|doc| {
            doc["components"]["schemas"]["Accepted"]["properties"]["stream_version"] = json!({"type": "integer"});
            doc["components"]["schemas"]["Create"]["properties"]["reference"] = json!({"type": "string"});
            doc["components"]["schemas"]["Provider"]["enum"] = json!(["aws", "gcp", "azure"]);
            doc["paths"]["/v1/users"] = json!({"post": {"responses": {"201": {"description": "x"}}}});
            doc["paths"]["/v1/devices"]["post"]["parameters"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "traceparent", "in": "header", "schema": {"type": "string"}}));
            doc["paths"]["/v1/devices"]["post"]["responses"]["201"]["headers"]["x-trace-id"] =
                json!({"required": true, "schema": {"type": "string"}});
            doc["paths"]["/v1/devices"]["post"]["responses"]["429"] = json!({"description": "Slow down"});
        });
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn removed_paths_operations_and_success_responses_break() {
        let found = changes(|doc| {
            remove(doc, "/paths/~1v1~1devices~1{id}");
            remove(doc, "/paths/~1v1~1devices/post/responses/409");
        });
        assert_eq!(found, ["openapi test: removed path /v1/devices/{id}"]);
        let found = changes(|doc| {
            doc["paths"]["/v1/devices/{id}"] = json!({"get": {"responses": {}}});
        });
        assert_eq!(found, ["openapi test: removed operation DELETE /v1/devices/{id}"]);
        let found = changes(|doc| remove(doc, "/paths/~1v1~1devices/post/responses/201"));
        assert_eq!(found, ["openapi test: POST /v1/devices: removed response 201"]);
    }

    #[test]
    fn removed_enum_values_break_in_requests() {
        let found = changes(|doc| doc["components"]["schemas"]["Reason"]["enum"] = json!(["requested"]));
        assert_eq!(
            found,
            [r#"openapi test: POST /v1/devices request body.reason: removed enum value "idle""#]
        );
    }

    #[test]
    fn a_stricter_request_breaks_and_a_looser_one_does_not() {
        let found = changes(|doc| {
            doc["components"]["schemas"]["Create"]["required"] = json!(["provider", "cores"]);
            doc["components"]["schemas"]["Create"]["properties"]["reason"] =
                json!({"$ref": "#/components/schemas/Reason"});
            doc["paths"]["/v1/devices"]["post"]["parameters"][0]["required"] = json!(true);
        });
        assert_eq!(
            found,
            [
                "openapi test: POST /v1/devices request body.reason: null no longer accepted",
                "openapi test: POST /v1/devices request body: property cores became required",
                "openapi test: POST /v1/devices: header parameter idempotency-key became required",
            ]
        );
        let looser = changes(|doc| doc["components"]["schemas"]["Create"]["required"] = json!([]));
        assert!(looser.is_empty(), "{looser:?}");
    }

    #[test]
    fn a_looser_response_breaks_and_a_stricter_one_does_not() {
        let found = changes(|doc| {
            doc["components"]["schemas"]["Accepted"]["required"] = json!(["id"]);
            doc["components"]["schemas"]["Accepted"]["properties"]["id"] = json!({"type": ["string", "null"]});
            doc["paths"]["/v1/devices"]["post"]["responses"]["201"]["headers"]["Location"]["required"] = json!(false);
        });
        assert_eq!(
            found,
            [
                "openapi test: POST /v1/devices 201 response.id: may now be null",
                "openapi test: POST /v1/devices 201 response: property position is no longer always present",
                "openapi test: POST /v1/devices 201: response header Location is no longer always sent",
            ]
        );
        let stricter = changes(|doc| {
            doc["components"]["schemas"]["Accepted"]["required"] = json!(["id", "position", "tags"]);
        });
        assert!(stricter.is_empty(), "{stricter:?}");
    }

    #[test]
    fn a_changed_type_or_removed_parameter_breaks() {
        let found = changes(|doc| {
            doc["components"]["schemas"]["Accepted"]["properties"]["position"] = json!({"type": "string"});
            doc["paths"]["/v1/devices"]["post"]["parameters"] = json!([]);
        });
        assert_eq!(
            found,
            [
                "openapi test: POST /v1/devices 201 response.position: type changed from integer to string",
                "openapi test: POST /v1/devices: removed header parameter idempotency-key",
            ]
        );
    }

    #[test]
    fn schemas_that_refer_to_themselves_end() {
        let mut doc = base();
        doc["components"]["schemas"]["Accepted"]["properties"]["parent"] =
            json!({"$ref": "#/components/schemas/Accepted"});
        assert!(breaking_changes("test", &doc, &doc).is_empty());
    }
}
