//! Settings that must agree across nodes: KV routing needs KV events with one block size,
//! a prefill and its decode serve the same model, and a preprocessor tokenizes for the
//! model its engines run.

use std::collections::BTreeSet;

use crate::diagnostic::{Code, Diagnostic};
use crate::kinds::{EdgeKind, ENGINES};
use crate::spec::NodeSpec;
use crate::validate::resolve::Resolved;

fn block_size(n: &NodeSpec) -> i64 {
    n.settings
        .get("block_size")
        .and_then(|v| v.value.as_i64())
        .unwrap_or(16)
}

fn kv_events(n: &NodeSpec) -> bool {
    n.settings
        .get("kv_events")
        .and_then(|v| v.value.as_bool())
        .unwrap_or(true)
}

pub fn check(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    routers(r, diags);
    kv_handoff(r, diags);
    models(r, diags);
    engine_settings(r, diags);
}

fn routers(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    for (i, router) in r.spec.nodes.iter().enumerate() {
        if r.kind(i).is_none_or(|k| k.name != "router") {
            continue;
        }
        let mode = router.setting_str("mode").unwrap_or("round-robin");
        let mode_span = router.setting_span("mode").unwrap_or(router.name.span);
        let workers: BTreeSet<usize> = r
            .edges
            .iter()
            .filter(|e| {
                e.from.node == i
                    && e.from.port.edge == EdgeKind::Call
                    && r.kind(e.to.node).is_some_and(|k| k.engine)
            })
            .map(|e| e.to.node)
            .collect();
        let feeds_events: BTreeSet<usize> = r
            .edges
            .iter()
            .filter(|e| e.to.node == i && e.to.port.name == "events")
            .map(|e| e.from.node)
            .collect();
        if mode == "kv" {
            for &w in &workers {
                let node = &r.spec.nodes[w];
                if let Some(d) =
                    crate::validate::engines::kv_router_over_external(router, mode_span, node)
                {
                    diags.push(d);
                } else if !kv_events(node) {
                    let span = node.setting_span("kv_events").unwrap_or(node.name.span);
                    diags.push(
                        Diagnostic::at(Code::E0301, span, format!("router `{}` routes by KV events, but `{}` publishes none", router.name.value, node.name.value))
                            .label("`kv_events = false`")
                            .with_label(mode_span, "`mode = \"kv\"` needs KV events")
                            .help("set `kv_events = true`, or use `mode = \"kv-approx\"`, which needs no events"),
                    );
                } else if !feeds_events.contains(&w) {
                    diags.push(
                        Diagnostic::at(Code::E0301, node.name.span, format!("router `{}` routes by KV events, but no events edge comes from `{}`", router.name.value, node.name.value))
                            .label("its `events` port is not connected to the router")
                            .with_label(mode_span, "`mode = \"kv\"` needs KV events")
                            .help(format!("add `\"{}.events ~> {}.events\"` to the edges", node.name.value, router.name.value)),
                    );
                }
            }
        } else if mode != "kv-approx" {
            for &w in &feeds_events {
                let e = r
                    .edges
                    .iter()
                    .find(|e| e.from.node == w && e.to.node == i && e.to.port.name == "events");
                if let Some(e) = e {
                    diags.push(
                        Diagnostic::at(
                            Code::W0001,
                            r.spec.edges[e.index].span,
                            format!(
                                "router `{}` ignores KV events in mode `{mode}`",
                                router.name.value
                            ),
                        )
                        .label("these events are never read")
                        .with_label(mode_span, format!("mode `{mode}`"))
                        .help("use `mode = \"kv\"` to route by them, or remove the edge"),
                    );
                }
            }
        }
        if mode == "kv" || mode == "kv-approx" {
            let sizes: BTreeSet<i64> = workers
                .iter()
                .map(|&w| block_size(&r.spec.nodes[w]))
                .collect();
            if sizes.len() > 1 {
                let mut ws = workers.iter();
                if let Some(&first) = ws.next() {
                    let f = &r.spec.nodes[first];
                    let mut d = Diagnostic::at(
                        Code::E0302,
                        f.setting_span("block_size").unwrap_or(f.name.span),
                        format!(
                            "workers behind router `{}` use different block sizes",
                            router.name.value
                        ),
                    )
                    .label(format!(
                        "`{}` uses {}",
                        f.name.value,
                        block_size(f)
                    ));
                    for &w in ws {
                        let n = &r.spec.nodes[w];
                        d = d.with_label(
                            n.setting_span("block_size").unwrap_or(n.name.span),
                            format!("`{}` uses {}", n.name.value, block_size(n)),
                        );
                    }
                    diags.push(d.help("KV overlap is counted in blocks: give every worker behind one KV router the same `block_size`"));
                }
            }
        }
    }
}

fn kv_handoff(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    for e in r
        .edges
        .iter()
        .filter(|e| e.from.port.name == "kv" && e.to.port.name == "kv")
    {
        let (p, d) = (&r.spec.nodes[e.from.node], &r.spec.nodes[e.to.node]);
        if let (Some(pm), Some(dm)) = (p.setting_str("model"), d.setting_str("model")) {
            if pm != dm {
                diags.push(
                    Diagnostic::at(
                        Code::E0303,
                        d.setting_span("model").unwrap_or(d.name.span),
                        format!(
                            "`{}` receives KV blocks of model `{pm}` but serves `{dm}`",
                            d.name.value
                        ),
                    )
                    .label(format!("serves `{dm}`"))
                    .with_label(
                        p.setting_span("model").unwrap_or(p.name.span),
                        format!("`{}` computes KV for `{pm}`", p.name.value),
                    )
                    .help("a prefill worker and its decode worker must serve the same model"),
                );
            }
        }
        if block_size(p) != block_size(d) {
            diags.push(
                Diagnostic::at(
                    Code::E0302,
                    d.setting_span("block_size").unwrap_or(d.name.span),
                    format!(
                        "`{}` and `{}` exchange KV blocks of different sizes",
                        p.name.value, d.name.value
                    ),
                )
                .label(format!("`{}` uses {}", d.name.value, block_size(d)))
                .with_label(
                    p.setting_span("block_size").unwrap_or(p.name.span),
                    format!("`{}` uses {}", p.name.value, block_size(p)),
                )
                .help("give both the same `block_size`"),
            );
        }
    }
}

/// Every engine a preprocessor's requests reach must serve the preprocessor's model.
fn models(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    let n = r.spec.nodes.len();
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    for e in r
        .edges
        .iter()
        .filter(|e| e.from.port.edge == EdgeKind::Call)
    {
        out[e.from.node].push(e.to.node);
    }
    for (i, pre) in r.spec.nodes.iter().enumerate() {
        if r.kind(i).is_none_or(|k| k.name != "preprocessor") {
            continue;
        }
        let Some(model) = pre.setting_str("model") else {
            continue;
        };
        let mut seen = vec![false; n];
        let mut stack = vec![i];
        seen[i] = true;
        while let Some(x) = stack.pop() {
            for &y in &out[x] {
                if seen[y] {
                    continue;
                }
                seen[y] = true;
                stack.push(y);
                let node = &r.spec.nodes[y];
                if r.kind(y).is_some_and(|k| k.engine) {
                    if let Some(m) = node.setting_str("model") {
                        if m != model {
                            diags.push(
                                Diagnostic::at(Code::E0304, node.setting_span("model").unwrap_or(node.name.span), format!("`{}` serves `{m}` but its requests are tokenized for `{model}`", node.name.value))
                                    .label(format!("serves `{m}`"))
                                    .with_label(pre.setting_span("model").unwrap_or(pre.name.span), format!("preprocessor `{}` tokenizes for `{model}`", pre.name.value))
                                    .help("token ids only mean something to the model they were made for: use one model along a path"),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Engine settings that contradict each other or do nothing.
fn engine_settings(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    for (i, node) in r.spec.nodes.iter().enumerate() {
        let Some(kind) = r.kind(i) else { continue };
        if kind.engine {
            if node.setting_str("device") == Some("cuda") && node.gpus.value == 0 {
                diags.push(
                    Diagnostic::at(
                        Code::E0008,
                        node.setting_span("device").unwrap_or(node.name.span),
                        format!(
                            "`{}` keeps its KV cache on a GPU but asks for no GPUs",
                            node.name.value
                        ),
                    )
                    .label("`device = \"cuda\"`")
                    .with_label(node.gpus.span, "gpus is 0")
                    .help("set `gpus = 1` (or more), or `device = \"cpu\"`"),
                );
            }
            let engine = node.setting_str("engine").unwrap_or(ENGINES[0]);
            let useless: &[&str] = match engine {
                "mocker" => &["threads"],
                "native" | "llamacpp" => &["speedup"],
                _ => crate::validate::engines::IN_PROCESS_ONLY,
            };
            for key in useless {
                if let Some(span) = node.setting_span(key) {
                    diags.push(
                        Diagnostic::at(
                            Code::W0002,
                            span,
                            format!("`{key}` has no effect on the {engine} engine"),
                        )
                        .label("ignored")
                        .help(format!("remove it, or use an engine that reads `{key}`")),
                    );
                }
            }
        }
        let disaggregated = r
            .edges
            .iter()
            .any(|e| e.from.node == i && e.from.port.name == "decode");
        if kind.name == "router" && !disaggregated {
            for key in ["prefill_threshold", "max_prefill_queue", "enforce_disagg"] {
                if let Some(span) = node.setting_span(key) {
                    diags.push(
                        Diagnostic::at(Code::W0002, span, format!("`{key}` only applies to a router with a `decode` output"))
                            .label("ignored")
                            .help("connect `router.prefill` and `router.decode` for disaggregated serving, or remove it"),
                    );
                }
            }
        }
        if kind.name == "router" && node.setting_str("mode") != Some("kv-approx") {
            if let Some(span) = node.setting_span("ttl") {
                diags.push(
                    Diagnostic::at(
                        Code::W0002,
                        span,
                        "`ttl` only applies to `mode = \"kv-approx\"`",
                    )
                    .label("ignored")
                    .help("remove it, or set `mode = \"kv-approx\"`"),
                );
            }
        }
    }
}
