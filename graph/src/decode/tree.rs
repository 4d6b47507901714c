//! The parsed file as an owned tree where every key and value keeps its span.

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diagnostic::{Code, Diagnostic};
use crate::source::{Sp, Span};

#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Table),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub span: Span,
    pub val: Val,
}

/// A table's entries in file order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    pub entries: Vec<(Sp<String>, Node)>,
}

impl Table {
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.value == key)
            .map(|(_, v)| v)
    }

    pub fn key(&self, key: &str) -> Option<&Sp<String>> {
        self.entries
            .iter()
            .find(|(k, _)| k.value == key)
            .map(|(k, _)| k)
    }
}

impl Val {
    /// The TOML name of this value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Val::Str(_) => "a string",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a float",
            Val::Bool(_) => "a boolean",
            Val::Datetime(_) => "a datetime",
            Val::Array(_) => "an array",
            Val::Table(_) => "a table",
        }
    }
}

/// Parse TOML text. Every syntax error is reported; the tree holds what could be read.
pub fn parse(text: &str) -> (Node, Vec<Diagnostic>) {
    let (doc, errors) = DeTable::parse_recoverable(text);
    let mut diags = Vec::new();
    for e in errors {
        let span = e.span().map(Span::from).unwrap_or_default();
        let msg = e.message().trim().to_string();
        let d = if msg.starts_with("duplicate key") {
            let key = text.get(span.start..span.end).unwrap_or("").trim();
            Diagnostic::at(Code::E0006, span, format!("`{key}` is defined twice"))
                .label("defined again here")
                .help("names of nodes, models, machines and keys must be unique; rename or merge one of them")
        } else {
            Diagnostic::at(Code::E0001, span, format!("invalid TOML: {msg}")).label("here")
        };
        diags.push(d);
    }
    let span = doc.span();
    let table = convert_table(doc.get_ref(), &mut diags);
    (
        Node {
            span: Span::new(span.start, span.end.max(text.len())),
            val: Val::Table(table),
        },
        diags,
    )
}

fn convert_table(t: &DeTable<'_>, diags: &mut Vec<Diagnostic>) -> Table {
    Table {
        entries: t
            .iter()
            .map(|(k, v)| {
                let ks = k.span();
                (
                    Sp::new(k.get_ref().to_string(), Span::new(ks.start, ks.end)),
                    convert(v, diags),
                )
            })
            .collect(),
    }
}

fn convert(v: &Spanned<DeValue<'_>>, diags: &mut Vec<Diagnostic>) -> Node {
    let r = v.span();
    let span = Span::new(r.start, r.end);
    let val = match v.get_ref() {
        DeValue::String(s) => Val::Str(s.to_string()),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Val::Int(n),
            Err(_) => {
                diags.push(
                    Diagnostic::at(Code::E0007, span, "integer does not fit in 64 bits")
                        .label("too large"),
                );
                Val::Int(i64::MAX)
            }
        },
        DeValue::Float(f) => Val::Float(parse_float(f.as_str())),
        DeValue::Boolean(b) => Val::Bool(*b),
        DeValue::Datetime(d) => Val::Datetime(d.to_string()),
        DeValue::Array(a) => Val::Array(a.iter().map(|x| convert(x, diags)).collect()),
        DeValue::Table(t) => Val::Table(convert_table(t, diags)),
    };
    Node { span, val }
}

fn parse_float(s: &str) -> f64 {
    match s {
        "inf" | "+inf" => f64::INFINITY,
        "-inf" => f64::NEG_INFINITY,
        "nan" | "+nan" | "-nan" => f64::NAN,
        _ => s.replace('_', "").parse().unwrap_or(f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_spans_and_order() {
        let text = "[b]\nx = 1\n[a]\ny = \"s\"\n";
        let (root, diags) = parse(text);
        assert!(diags.is_empty());
        let Val::Table(t) = root.val else {
            panic!("root is a table")
        };
        let keys: Vec<&str> = t.entries.iter().map(|(k, _)| k.value.as_str()).collect();
        assert_eq!(keys, ["b", "a"]);
        let Some(Val::Table(b)) = t.get("b").map(|n| &n.val) else {
            panic!("b is a table")
        };
        let x = b.get("x").map(|n| n.span);
        assert_eq!(x.map(|s| &text[s.start..s.end]), Some("1"));
    }

    #[test]
    fn reports_every_syntax_error() {
        let (_, diags) = parse("a = \nb = [1,\n[c]\nd = = 2\n");
        assert!(diags.len() >= 2, "{diags:?}");
        assert!(diags.iter().all(|d| d.code == Code::E0001));
    }

    #[test]
    fn duplicate_keys_are_duplicate_names() {
        let (_, diags) = parse("[nodes.a]\nkind = \"x\"\n[nodes.a]\nkind = \"y\"\n");
        assert_eq!(diags.first().map(|d| d.code), Some(Code::E0006));
    }
}
