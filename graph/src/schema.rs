//! The JSON Schema of graph files, written from the same field catalogue the decoder
//! checks against, so editors (taplo, Even Better TOML) complete exactly what we accept.

use serde_json::{json, Map, Value};

use crate::fields::{default_json, Field, Ty};
use crate::format;
use crate::kinds::KINDS;

fn ty_schema(ty: &Ty) -> Value {
    match ty {
        Ty::Str => json!({"type": "string"}),
        Ty::Bool => json!({"type": "boolean"}),
        Ty::Int { min, max } => {
            let mut m = Map::new();
            m.insert("type".into(), json!("integer"));
            m.insert("minimum".into(), json!(min));
            if *max < i64::MAX {
                m.insert("maximum".into(), json!(max));
            }
            Value::Object(m)
        }
        Ty::Float { min, max } => {
            let mut m = Map::new();
            m.insert("type".into(), json!("number"));
            m.insert("minimum".into(), json!(min));
            if max.is_finite() {
                m.insert("maximum".into(), json!(max));
            }
            Value::Object(m)
        }
        Ty::Enum(values) => json!({"type": "string", "enum": values}),
        Ty::Duration => {
            json!({"type": "string", "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*[a-z]+(\\s*[0-9]+(\\.[0-9]+)?\\s*[a-z]+)*\\s*$"})
        }
        Ty::StrMap => json!({"type": "object", "additionalProperties": {"type": "string"}}),
        Ty::Table(fields) => object(&[fields], None),
        Ty::MapOf(fields) => {
            json!({"type": "object", "additionalProperties": object(&[fields], None)})
        }
        Ty::ArrayOf(fields) => json!({
            "type": "array",
            "items": {"anyOf": [
                object(&[fields], None),
                {"type": "string", "description": "shorthand: \"node.port -> node.port\" (call) or \"node.port ~> node.port\" (feedback)", "pattern": "^[^.]+(\\.[^.]+)?\\s*(->|~>)\\s*[^.]+(\\.[^.]+)?$"}
            ]}
        }),
    }
}

fn field_schema(f: &Field) -> Value {
    let mut s = ty_schema(&f.ty);
    if let Value::Object(m) = &mut s {
        m.insert("description".into(), json!(f.doc));
        if let Some(d) = f.default.and_then(default_json) {
            m.insert("default".into(), d);
        }
    }
    s
}

fn object(groups: &[&[Field]], kind: Option<&str>) -> Value {
    let mut props = Map::new();
    let mut required = Vec::new();
    for f in groups.iter().flat_map(|g| g.iter()) {
        props.insert(f.key.to_string(), field_schema(f));
        if f.required {
            required.push(f.key);
        }
    }
    if let (Some(k), Some(Value::Object(m))) = (kind, props.get_mut("kind")) {
        m.insert("const".into(), json!(k));
    }
    json!({
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": false,
    })
}

/// The schema as a JSON value.
pub fn json_schema() -> Value {
    let nodes = json!({
        "type": "object",
        "description": "nodes by name",
        "additionalProperties": {
            "oneOf": KINDS.iter().map(|k| {
                let mut o = object(&[format::NODE, k.settings], Some(k.name));
                if let Value::Object(m) = &mut o {
                    m.insert("title".into(), json!(k.name));
                    m.insert("description".into(), json!(k.doc));
                }
                o
            }).collect::<Vec<_>>()
        }
    });
    let mut top = object(&[format::TOP], None);
    if let Some(Value::Object(props)) = top.get_mut("properties") {
        props.insert("nodes".into(), nodes);
    }
    if let Value::Object(m) = &mut top {
        m.insert(
            "$schema".into(),
            json!("http://json-schema.org/draft-07/schema#"),
        );
        m.insert("title".into(), json!("dynamo graph"));
        m.insert(
            "description".into(),
            json!("A dynamo serving graph: models, nodes, edges and an optional cluster."),
        );
    }
    top
}

pub fn json_schema_string() -> String {
    serde_json::to_string_pretty(&json_schema()).unwrap_or_default()
}
