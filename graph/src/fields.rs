//! The field catalogue: every key the format knows, its type, default and doc. The
//! decoder checks the file against it and `graph schema` writes it out as JSON Schema,
//! so the two can never disagree.

/// The type of a key's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ty {
    Str,
    Int {
        min: i64,
        max: i64,
    },
    Float {
        min: f64,
        max: f64,
    },
    Bool,
    /// One of these strings.
    Enum(&'static [&'static str]),
    /// A duration such as `"30s"` or `"250ms"`.
    Duration,
    /// A table of string → string (labels).
    StrMap,
    /// A table with its own fields.
    Table(&'static [Field]),
    /// A table of named tables, each with these fields (`[nodes.NAME]`).
    MapOf(&'static [Field]),
    /// An array of tables with these fields (`[[edges]]`); strings are shorthands.
    ArrayOf(&'static [Field]),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Field {
    pub key: &'static str,
    pub ty: Ty,
    pub required: bool,
    /// The default, as it would be written in the file; `None` when there is none.
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

impl Field {
    pub const fn req(key: &'static str, ty: Ty, doc: &'static str) -> Field {
        Field {
            key,
            ty,
            required: true,
            default: None,
            doc,
        }
    }

    pub const fn opt(
        key: &'static str,
        ty: Ty,
        default: Option<&'static str>,
        doc: &'static str,
    ) -> Field {
        Field {
            key,
            ty,
            required: false,
            default,
            doc,
        }
    }
}

pub const fn int(min: i64, max: i64) -> Ty {
    Ty::Int { min, max }
}

pub const fn float(min: f64, max: f64) -> Ty {
    Ty::Float { min, max }
}

pub const POSITIVE: Ty = int(1, i64::MAX);
pub const NON_NEGATIVE: Ty = int(0, i64::MAX);

/// A catalogue default (a TOML literal such as `"\"kv\""`, `16` or `true`) as JSON.
/// Infinity, which JSON lacks, is written as the string `"inf"`.
pub fn default_json(literal: &str) -> Option<serde_json::Value> {
    use crate::decode::tree::{self, Val};
    let (root, errs) = tree::parse(&format!("v = {literal}"));
    if !errs.is_empty() {
        return None;
    }
    let Val::Table(t) = root.val else { return None };
    Some(match &t.get("v")?.val {
        Val::Str(s) => serde_json::Value::String(s.clone()),
        Val::Int(n) => serde_json::Value::from(*n),
        Val::Float(x) => serde_json::Number::from_f64(*x).map_or_else(
            || serde_json::Value::String(x.to_string()),
            serde_json::Value::Number,
        ),
        Val::Bool(b) => serde_json::Value::Bool(*b),
        _ => return None,
    })
}
