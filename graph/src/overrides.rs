//! `--set node.key=value`: override one node setting from the command line, checked
//! against the kind's catalogue like the file itself.

use crate::decode::reader;
use crate::decode::tree::{self, Val};
use crate::kinds;
use crate::plan::Plan;
use crate::source::Span;
use crate::suggest;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverrideError {
    #[error("`{0}` is not `node.key=value`")]
    Syntax(String),
    #[error("no node `{node}` in this graph{}", help.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    UnknownNode { node: String, help: Option<String> },
    #[error("{kind} `{node}` has no setting `{key}`{}", help.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    UnknownKey {
        node: String,
        kind: String,
        key: String,
        help: Option<String>,
    },
    #[error("`{node}.{key}`: {message}")]
    Invalid {
        node: String,
        key: String,
        message: String,
    },
}

/// Apply `node.key=value` to the plan. The value is a TOML literal (`0`, `"kv"`, `true`);
/// a bare word is taken as a string.
pub fn apply(plan: &mut Plan, text: &str) -> Result<(), OverrideError> {
    let (lhs, value) = text
        .split_once('=')
        .ok_or_else(|| OverrideError::Syntax(text.to_string()))?;
    let (node_name, key) = lhs
        .trim()
        .split_once('.')
        .ok_or_else(|| OverrideError::Syntax(text.to_string()))?;
    let names: Vec<String> = plan.nodes.iter().map(|n| n.name.clone()).collect();
    if node_name == "telemetry" && !names.iter().any(|n| n == "telemetry") {
        return apply_telemetry(plan, key, value.trim());
    }
    let node = plan
        .nodes
        .iter_mut()
        .find(|n| n.name == node_name)
        .ok_or_else(|| OverrideError::UnknownNode {
            node: node_name.to_string(),
            help: suggest::help_for(node_name, "nodes", names.iter().map(String::as_str)),
        })?;
    let kind = kinds::kind(&node.kind).ok_or_else(|| OverrideError::Syntax(text.to_string()))?;
    let field = kind.setting(key).ok_or_else(|| OverrideError::UnknownKey {
        node: node_name.to_string(),
        kind: kind.name.to_string(),
        key: key.to_string(),
        help: suggest::help_for(key, "settings", kind.settings.iter().map(|f| f.key)),
    })?;
    let value = value.trim();
    let mut literal = format!("{key} = {value}");
    if tree::parse(&literal).1.iter().any(|d| d.is_error()) {
        literal = format!("{key} = {}", serde_json::Value::String(value.to_string()));
    }
    let (root, _) = tree::parse(&literal);
    let Val::Table(t) = &root.val else {
        return Err(OverrideError::Syntax(text.to_string()));
    };
    let mut diags = Vec::new();
    let checked = reader::check(
        t,
        Span::default(),
        &[std::slice::from_ref(field)],
        &format!("node `{node_name}`"),
        &mut diags,
    );
    if let Some(d) = diags.first() {
        return Err(OverrideError::Invalid {
            node: node_name.to_string(),
            key: key.to_string(),
            message: d.message.clone(),
        });
    }
    if let Some(v) = checked.json(key) {
        node.settings.insert(key.to_string(), v.value);
    }
    Ok(())
}

/// `telemetry.key=value`: a key of the `[telemetry]` section.
fn apply_telemetry(plan: &mut Plan, key: &str, value: &str) -> Result<(), OverrideError> {
    let field = crate::format::TELEMETRY
        .iter()
        .find(|f| f.key == key)
        .ok_or_else(|| OverrideError::UnknownKey {
            node: "telemetry".to_string(),
            kind: "[telemetry]".to_string(),
            key: key.to_string(),
            help: suggest::help_for(
                key,
                "settings",
                crate::format::TELEMETRY.iter().map(|f| f.key),
            ),
        })?;
    let mut literal = format!("{key} = {value}");
    if tree::parse(&literal).1.iter().any(|d| d.is_error()) {
        literal = format!("{key} = {}", serde_json::Value::String(value.to_string()));
    }
    let (root, _) = tree::parse(&literal);
    let Val::Table(t) = &root.val else {
        return Err(OverrideError::Syntax(format!("telemetry.{key}={value}")));
    };
    let mut diags = Vec::new();
    let checked = reader::check(
        t,
        Span::default(),
        &[std::slice::from_ref(field)],
        "[telemetry]",
        &mut diags,
    );
    if let Some(d) = diags.first() {
        return Err(OverrideError::Invalid {
            node: "telemetry".to_string(),
            key: key.to_string(),
            message: d.message.clone(),
        });
    }
    let t = &mut plan.telemetry;
    let url = |s: &String| s.starts_with("http://") || s.starts_with("https://");
    match key {
        "otlp_endpoint" if !checked.str(key).is_some_and(|s| url(&s.value)) => {
            return Err(OverrideError::Invalid {
                node: "telemetry".to_string(),
                key: key.to_string(),
                message: format!("`{value}` is not an http:// or https:// URL"),
            });
        }
        "otlp_endpoint" => t.otlp_endpoint = checked.str(key).map(|s| s.value),
        "sampling_ratio" => t.sampling_ratio = checked.float(key).map_or(1.0, |r| r.value),
        _ => t.service_name = checked.str(key).map(|s| s.value),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{check, Environment, SourceFile};

    fn plan() -> Plan {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../graphs/agg.toml"))
                .unwrap_or_default();
        check(SourceFile::new("agg.toml", text), &Environment::default())
            .plan
            .expect("agg.toml is valid")
    }

    #[test]
    fn overrides_are_checked_like_the_file() {
        let mut p = plan();
        apply(&mut p, "frontend.port=0").expect("valid");
        assert_eq!(p.node("frontend").and_then(|n| n.u64("port")), Some(0));
        apply(&mut p, "router.mode=random").expect("bare words are strings");
        assert_eq!(p.node("router").and_then(|n| n.str("mode")), Some("random"));
        assert!(matches!(
            apply(&mut p, "frontend.prot=1"),
            Err(OverrideError::UnknownKey { help: Some(_), .. })
        ));
        assert!(matches!(
            apply(&mut p, "fronted.port=1"),
            Err(OverrideError::UnknownNode { help: Some(_), .. })
        ));
        assert!(matches!(
            apply(&mut p, "frontend.port=70000"),
            Err(OverrideError::Invalid { .. })
        ));
        assert!(matches!(
            apply(&mut p, "router.mode=kv-aprox"),
            Err(OverrideError::Invalid { .. })
        ));
        assert!(matches!(
            apply(&mut p, "nonsense"),
            Err(OverrideError::Syntax(_))
        ));
    }

    #[test]
    fn telemetry_overrides_set_the_section() {
        let mut p = plan();
        assert_eq!(p.telemetry.otlp_endpoint, None);
        apply(&mut p, "telemetry.otlp_endpoint=http://127.0.0.1:4317").expect("valid");
        apply(&mut p, "telemetry.sampling_ratio=0.25").expect("valid");
        assert_eq!(
            p.telemetry.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert_eq!(p.telemetry.sampling_ratio, 0.25);
        assert!(matches!(
            apply(&mut p, "telemetry.sampling_ratio=2"),
            Err(OverrideError::Invalid { .. })
        ));
        assert!(matches!(
            apply(&mut p, "telemetry.otlp_endpoint=localhost:4317"),
            Err(OverrideError::Invalid { .. })
        ));
        assert!(matches!(
            apply(&mut p, "telemetry.endpoint=x"),
            Err(OverrideError::UnknownKey { help: Some(_), .. })
        ));
    }
}
