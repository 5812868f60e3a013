//! Request validation against Nomad's OpenAPI schema (hashicorp/nomad-openapi, MPL-2.0).
//!
//! Real Nomad ignores unknown keys; the simulator rejects them (and mistyped values) with 400
//! so that a client's typo fails in tests instead of being silently dropped in production.
//! The schema predates Nomad 1.5, so the fields added since, which a current client or our
//! own GET output may carry, are allowed by [`NEWER_FIELDS`]. `null` is accepted everywhere,
//! as Go's decoder treats it as absent.

use std::sync::OnceLock;

use serde_json::{Map, Value};

/// `components.schemas` of `v1/openapi.yaml`, converted to JSON (see `schema/README.md`).
const SCHEMAS: &str = include_str!("../schema/nomad-openapi-v1-schemas.json");

/// Fields of Nomad ≥ 1.5 that the 2023 schema does not know, by schema name.
pub const NEWER_FIELDS: &[(&str, &[&str])] = &[
    ("Job", &["NodePool", "VersionTag", "UI", "ConsulCluster"]),
    ("JobRegisterRequest", &["Submission", "IdempotencyToken"]),
    ("TaskGroup", &["Disconnect", "PreventRescheduleOnLost", "Consul"]),
    ("Task", &["Identities", "Identity", "Actions", "Schedule", "Consul"]),
    ("Resources", &["SecretsMB", "NUMA"]),
    ("Port", &["IgnoreCollision"]),
    ("RestartPolicy", &["RenderTemplates"]),
    ("LogConfig", &["Disabled", "Enabled"]),
    ("NetworkResource", &["CNI"]),
];

/// A request body the schema does not accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemaError {
    #[error("unknown field {path} (not in Nomad's OpenAPI schema {schema})")]
    UnknownField { path: String, schema: String },
    #[error("field {path} must be {expected}, got {got}")]
    WrongType { path: String, expected: String, got: String },
    #[error("schema {0} is missing")]
    MissingSchema(String),
}

/// All schemas by name.
pub fn schemas() -> &'static Map<String, Value> {
    static SCHEMAS_JSON: OnceLock<Map<String, Value>> = OnceLock::new();
    SCHEMAS_JSON.get_or_init(|| {
        let document: Value = serde_json::from_str(SCHEMAS).expect("the embedded schema is JSON");
        match document.get("schemas") {
            Some(Value::Object(map)) => map.clone(),
            _ => Map::new(),
        }
    })
}

/// Validates `value` against the schema named `name` (e.g. `JobRegisterRequest`).
pub fn validate(name: &str, value: &Value) -> Result<(), SchemaError> {
    let schema = schemas().get(name).ok_or_else(|| SchemaError::MissingSchema(name.to_owned()))?;
    check(schema, Some(name), value, name)
}

/// The property names of a schema (with the newer fields we allow).
pub fn property_names(name: &str) -> Vec<String> {
    let mut names: Vec<String> = schemas()
        .get(name)
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    names.extend(newer_fields(name).iter().map(|f| (*f).to_owned()));
    names
}

fn newer_fields(name: &str) -> &'static [&'static str] {
    NEWER_FIELDS.iter().find(|(n, _)| *n == name).map_or(&[], |(_, fields)| fields)
}

fn resolve(schema: &Value) -> Result<(&Value, Option<&str>), SchemaError> {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference.rsplit('/').next().unwrap_or(reference);
            let target =
                schemas().get(name).ok_or_else(|| SchemaError::MissingSchema(name.to_owned()))?;
            Ok((target, Some(name)))
        }
        None => Ok((schema, None)),
    }
}

fn check(schema: &Value, name: Option<&str>, value: &Value, path: &str) -> Result<(), SchemaError> {
    let (schema, referenced) = resolve(schema)?;
    let name = referenced.or(name);
    if value.is_null() {
        return Ok(());
    }
    let wrong = |expected: &str| SchemaError::WrongType {
        path: path.to_owned(),
        expected: expected.to_owned(),
        got: type_name(value).to_owned(),
    };
    match schema.get("type").and_then(Value::as_str) {
        Some("object") | None if schema.get("properties").is_some() => {
            let object = value.as_object().ok_or_else(|| wrong("an object"))?;
            check_object(schema, name.unwrap_or("(inline)"), object, path)
        }
        Some("object") => {
            let object = value.as_object().ok_or_else(|| wrong("an object"))?;
            check_map(schema, object, path)
        }
        Some("array") => {
            let items = value.as_array().ok_or_else(|| wrong("an array"))?;
            match schema.get("items") {
                Some(item_schema) => items.iter().enumerate().try_for_each(|(i, item)| {
                    check(item_schema, None, item, &format!("{path}[{i}]"))
                }),
                None => Ok(()),
            }
        }
        Some("string") => value.is_string().then_some(()).ok_or_else(|| wrong("a string")),
        Some("boolean") => value.is_boolean().then_some(()).ok_or_else(|| wrong("a boolean")),
        Some("integer") => {
            (value.is_i64() || value.is_u64()).then_some(()).ok_or_else(|| wrong("an integer"))
        }
        Some("number") => value.is_number().then_some(()).ok_or_else(|| wrong("a number")),
        _ => Ok(()),
    }
}

fn check_object(
    schema: &Value,
    name: &str,
    object: &Map<String, Value>,
    path: &str,
) -> Result<(), SchemaError> {
    let properties = schema.get("properties").and_then(Value::as_object);
    for (key, value) in object {
        let child = format!("{path}.{key}");
        match properties.and_then(|p| p.get(key)) {
            Some(property) => check(property, None, value, &child)?,
            None if newer_fields(name).contains(&key.as_str()) => {}
            None => {
                return Err(SchemaError::UnknownField { path: child, schema: name.to_owned() });
            }
        }
    }
    Ok(())
}

/// A map (`additionalProperties`): `Meta`, `Config`, `Env`.
fn check_map(schema: &Value, object: &Map<String, Value>, path: &str) -> Result<(), SchemaError> {
    match schema.get("additionalProperties") {
        Some(values) if values.as_object().is_some_and(|o| !o.is_empty()) => {
            object.iter().try_for_each(|(k, v)| check(values, None, v, &format!("{path}.{k}")))
        }
        _ => Ok(()),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a fraction",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn accepts_known_fields_and_nulls() {
        let body = json!({"Job": {"ID": "x", "TaskGroups": [{"Name": "g", "Count": 1, "Meta": null,
            "Tasks": [{"Name": "t", "Config": {"image": "a", "args": ["b"]},
                       "Resources": {"CPU": 1, "MemoryMaxMB": 5}}]}]}});
        assert_eq!(validate("JobRegisterRequest", &body), Ok(()));
    }

    #[test]
    fn rejects_unknown_and_mistyped_fields() {
        let typo = json!({"Job": {"TaskGroups": [{"Tasks": [{"Resources": {"MemoryMax": 5}}]}]}});
        let error = validate("JobRegisterRequest", &typo).unwrap_err();
        assert!(error.to_string().contains("Job.TaskGroups[0].Tasks[0].Resources.MemoryMax"));
        let mistyped = json!({"Job": {"TaskGroups": [{"Count": "1"}]}});
        assert!(matches!(
            validate("JobRegisterRequest", &mistyped),
            Err(SchemaError::WrongType { .. })
        ));
        let meta = json!({"Job": {"Meta": {"a": 1}}});
        assert!(validate("JobRegisterRequest", &meta).is_err());
    }
}
