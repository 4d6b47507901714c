//! Checking one table against its field catalogue: unknown keys (with the closest valid
//! key), wrong types, values outside an enum or a range, missing required keys. Every
//! problem is collected; what is valid can then be read without further checks.

use crate::decode::tree::{Node, Table, Val};
use crate::diagnostic::{Code, Diagnostic};
use crate::fields::{Field, Ty};
use crate::source::{Sp, Span};
use crate::suggest;

/// A checked table: the entries whose values passed their type check.
pub struct Checked<'a> {
    pub table: &'a Table,
    /// Span used for "missing key" errors: the table's header or inline table.
    pub span: Span,
    ok: Vec<&'a str>,
}

/// Check `table` (whose header is at `span`) against `fields`. `what` names the section
/// in messages ("node `decode`").
pub fn check<'a>(
    table: &'a Table,
    span: Span,
    fields: &[&[Field]],
    what: &str,
    diags: &mut Vec<Diagnostic>,
) -> Checked<'a> {
    let all = || fields.iter().flat_map(|f| f.iter());
    let mut ok = Vec::new();
    for (key, node) in &table.entries {
        match all().find(|f| f.key == key.value) {
            None => {
                let help = suggest::help_for(&key.value, "keys here", all().map(|f| f.key));
                diags.push(
                    Diagnostic::at(
                        Code::E0002,
                        key.span,
                        format!("unknown key `{}` in {what}", key.value),
                    )
                    .label("not a key of this table")
                    .maybe_help(help),
                );
            }
            Some(f) => {
                if check_value(f, &key.value, node, what, diags) {
                    ok.push(f.key);
                }
            }
        }
    }
    for f in all().filter(|f| f.required) {
        if table.get(f.key).is_none() {
            diags.push(
                Diagnostic::at(
                    Code::E0005,
                    span,
                    format!("{what} is missing the required key `{}`", f.key),
                )
                .label(format!("`{}` must be set here", f.key))
                .help(format!("`{}`: {}", f.key, f.doc)),
            );
        }
    }
    Checked { table, span, ok }
}

fn type_word(ty: &Ty) -> String {
    match ty {
        Ty::Str | Ty::Enum(_) => "a string".into(),
        Ty::Duration => "a duration string such as \"30s\" or \"250ms\"".into(),
        Ty::Int { .. } => "an integer".into(),
        Ty::Float { .. } => "a number".into(),
        Ty::Bool => "a boolean (true or false)".into(),
        Ty::StrMap => "a table of strings".into(),
        Ty::Table(_) | Ty::MapOf(_) => "a table".into(),
        Ty::ArrayOf(_) => "an array".into(),
    }
}

/// Check one value; returns whether it is usable.
fn check_value(f: &Field, key: &str, node: &Node, what: &str, diags: &mut Vec<Diagnostic>) -> bool {
    let wrong = |diags: &mut Vec<Diagnostic>| {
        diags.push(
            Diagnostic::at(
                Code::E0003,
                node.span,
                format!(
                    "`{key}` in {what} must be {}, not {}",
                    type_word(&f.ty),
                    node.val.type_name()
                ),
            )
            .label(format!("expected {}", type_word(&f.ty)))
            .help(format!("`{key}`: {}", f.doc)),
        );
        false
    };
    match (&f.ty, &node.val) {
        (Ty::Str, Val::Str(_))
        | (Ty::Bool, Val::Bool(_))
        | (Ty::Table(_) | Ty::MapOf(_), Val::Table(_))
        | (Ty::ArrayOf(_), Val::Array(_)) => true,
        (Ty::Enum(allowed), Val::Str(s)) => {
            if allowed.contains(&s.as_str()) {
                true
            } else {
                let help = suggest::help_for(s, "values", allowed.iter().copied());
                diags.push(
                    Diagnostic::at(
                        Code::E0004,
                        node.span,
                        format!("`{s}` is not a valid `{key}` in {what}"),
                    )
                    .label(format!("expected one of {}", quote_list(allowed)))
                    .maybe_help(help),
                );
                false
            }
        }
        (Ty::Duration, Val::Str(s)) => match humantime::parse_duration(s) {
            Ok(_) => true,
            Err(e) => {
                diags.push(
                    Diagnostic::at(
                        Code::E0004,
                        node.span,
                        format!("`{s}` is not a duration: {e}"),
                    )
                    .label("expected a duration")
                    .help("write a number with a unit, such as \"30s\", \"250ms\" or \"2m\""),
                );
                false
            }
        },
        (Ty::Int { min, max }, Val::Int(n)) => in_range(
            key,
            what,
            node.span,
            *n as f64,
            *min as f64,
            *max as f64,
            diags,
        ),
        (Ty::Float { min, max }, Val::Float(x)) => {
            in_range(key, what, node.span, *x, *min, *max, diags)
        }
        (Ty::Float { min, max }, Val::Int(n)) => {
            in_range(key, what, node.span, *n as f64, *min, *max, diags)
        }
        (Ty::StrMap, Val::Table(t)) => {
            let mut good = true;
            for (k, v) in &t.entries {
                if !matches!(v.val, Val::Str(_)) {
                    diags.push(
                        Diagnostic::at(
                            Code::E0003,
                            v.span,
                            format!(
                                "`{key}.{}` must be a string, not {}",
                                k.value,
                                v.val.type_name()
                            ),
                        )
                        .label("expected a string"),
                    );
                    good = false;
                }
            }
            good
        }
        _ => wrong(diags),
    }
}

fn in_range(
    key: &str,
    what: &str,
    span: Span,
    x: f64,
    min: f64,
    max: f64,
    diags: &mut Vec<Diagnostic>,
) -> bool {
    if x.is_nan() || x < min || x > max {
        let range = if max >= i64::MAX as f64 || max.is_infinite() {
            format!("at least {min}")
        } else {
            format!("between {min} and {max}")
        };
        diags.push(
            Diagnostic::at(
                Code::E0007,
                span,
                format!("`{key}` in {what} must be {range}"),
            )
            .label(format!("must be {range}")),
        );
        false
    } else {
        true
    }
}

pub fn quote_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl<'a> Checked<'a> {
    fn valid(&self, key: &str) -> Option<&'a Node> {
        if self.ok.contains(&key) {
            self.table.get(key)
        } else {
            None
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.table.get(key).is_some()
    }

    pub fn str(&self, key: &str) -> Option<Sp<String>> {
        match self.valid(key) {
            Some(Node {
                span,
                val: Val::Str(s),
            }) => Some(Sp::new(s.clone(), *span)),
            _ => None,
        }
    }

    pub fn int(&self, key: &str) -> Option<Sp<i64>> {
        match self.valid(key) {
            Some(Node {
                span,
                val: Val::Int(n),
            }) => Some(Sp::new(*n, *span)),
            _ => None,
        }
    }

    pub fn float(&self, key: &str) -> Option<Sp<f64>> {
        match self.valid(key) {
            Some(Node {
                span,
                val: Val::Float(x),
            }) => Some(Sp::new(*x, *span)),
            Some(Node {
                span,
                val: Val::Int(n),
            }) => Some(Sp::new(*n as f64, *span)),
            _ => None,
        }
    }

    pub fn bool(&self, key: &str) -> Option<Sp<bool>> {
        match self.valid(key) {
            Some(Node {
                span,
                val: Val::Bool(b),
            }) => Some(Sp::new(*b, *span)),
            _ => None,
        }
    }

    pub fn table(&self, key: &str) -> Option<(&'a Table, Span)> {
        match self.valid(key) {
            Some(Node {
                span,
                val: Val::Table(t),
            }) => Some((t, *span)),
            _ => None,
        }
    }

    pub fn str_map(&self, key: &str) -> Vec<(Sp<String>, Sp<String>)> {
        let Some((t, _)) = self.table(key) else {
            return Vec::new();
        };
        t.entries
            .iter()
            .filter_map(|(k, v)| match &v.val {
                Val::Str(s) => Some((k.clone(), Sp::new(s.clone(), v.span))),
                _ => None,
            })
            .collect()
    }

    /// The valid values among `keys`, as JSON values (node settings).
    pub fn json(&self, key: &str) -> Option<Sp<serde_json::Value>> {
        let node = self.valid(key)?;
        Some(Sp::new(to_json(&node.val), node.span))
    }
}

fn to_json(v: &Val) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Val::Str(s) | Val::Datetime(s) => J::String(s.clone()),
        Val::Int(n) => J::from(*n),
        // JSON has no infinity: write it as the TOML spelling, `"inf"`.
        Val::Float(x) => {
            serde_json::Number::from_f64(*x).map_or_else(|| J::String(x.to_string()), J::Number)
        }
        Val::Bool(b) => J::Bool(*b),
        Val::Array(a) => J::Array(a.iter().map(|n| to_json(&n.val)).collect()),
        Val::Table(t) => J::Object(
            t.entries
                .iter()
                .map(|(k, n)| (k.value.clone(), to_json(&n.val)))
                .collect(),
        ),
    }
}
