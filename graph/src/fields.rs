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
