//! Process-wide tracing: log lines on stderr (`DYN_LOG`), and for a planned process whose
//! graph has `[telemetry] otlp_endpoint`, every node span exported over OTLP/gRPC.
//!
//! A planned process (`dynamo node run --plan … --process …`) finds its telemetry
//! settings in the plan it runs, the same value `graph plan` prints, so a `--set
//! telemetry.otlp_endpoint=…` on `graph up` reaches every process.

use std::path::Path;

use dynamo_graph::plan::Plan;
use dynamo_runtime::telemetry::{ExportConfig, ExportGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Keeps the exporter running; dropped at the end of `main`, which flushes it.
pub struct Tracing {
    _export: Option<ExportGuard>,
}

/// Installs the subscriber: `dyn_log` (RUST_LOG syntax, default `warn`) filters the log
/// lines; `export`, when given, adds the span exporter with its own filter.
pub fn init(dyn_log: Option<&str>, export: Option<ExportConfig>) -> Tracing {
    let filter =
        EnvFilter::try_new(dyn_log.unwrap_or("warn")).unwrap_or_else(|_| EnvFilter::new("warn"));
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let mut warning = None;
    let (otel, guard) = match export {
        Some(config) => match dynamo_runtime::telemetry::export::layer::<Registry>(&config) {
            Ok((layer, guard)) => (Some(layer), Some(guard)),
            Err(e) => {
                warning = Some(e.to_string());
                (None, None)
            }
        },
        None => (None, None),
    };
    tracing_subscriber::registry().with(otel).with(log).init();
    if let Some(w) = warning {
        tracing::warn!("traces are off: {w}");
    }
    Tracing { _export: guard }
}

/// The export settings of `process` of the plan at `path`, when its graph sends traces.
/// A plan that cannot be read gives `None` here; `node run` reports it properly.
pub fn from_plan_file(path: &Path, process: &str) -> Option<ExportConfig> {
    let text = std::fs::read_to_string(path).ok()?;
    let plan: Plan = serde_json::from_str(&text).ok()?;
    from_plan(&plan, process)
}

/// The `tracing` targets of the code that serves each node kind.
fn kind_targets(kind: &str) -> &'static [&'static str] {
    match kind {
        "frontend" => &["dynamo_frontend"],
        "preprocessor" => &["dynamo_preprocessor"],
        "router" => &["dynamo_router"],
        "worker" | "prefill" | "decode" => &["dynamo_mocker", "dynamo_native"],
        _ => &[],
    }
}

/// `service.name` is the node's name: the process's only node, or, in a process with
/// several, the node whose code made the span (by `tracing` target). Two nodes served by
/// the same code in one process cannot be told apart that way: their spans go to the
/// process's name.
pub fn from_plan(plan: &Plan, process: &str) -> Option<ExportConfig> {
    let endpoint = plan.telemetry.otlp_endpoint.clone()?;
    let planned = plan.process(process)?;
    let mut nodes: Vec<&str> = planned.replicas.iter().map(|r| r.node.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let default = match (&plan.telemetry.service_name, nodes.as_slice()) {
        (Some(name), _) => name.clone(),
        (None, [one]) => (*one).to_string(),
        (None, _) => process.to_string(),
    };
    let mut config = ExportConfig::new(endpoint, default);
    config.sampling_ratio = plan.telemetry.sampling_ratio;
    config.instance = process.to_string();
    if plan.telemetry.service_name.is_none() && nodes.len() > 1 {
        let mut claimed: Vec<(&str, Vec<&str>)> = Vec::new();
        for node in &nodes {
            let kind = plan.node(node).map_or("", |n| n.kind.as_str());
            for target in kind_targets(kind) {
                match claimed.iter_mut().find(|(t, _)| t == target) {
                    Some((_, owners)) => owners.push(node),
                    None => claimed.push((target, vec![node])),
                }
            }
        }
        config.services_by_target = claimed
            .into_iter()
            .filter_map(|(target, owners)| match owners.as_slice() {
                [one] => Some((target.to_string(), (*one).to_string())),
                _ => None,
            })
            .collect();
    }
    Some(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(sets: &[&str]) -> Plan {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../graphs/disagg.toml");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let checked = dynamo_graph::check(
            dynamo_graph::SourceFile::new("disagg.toml", text),
            &dynamo_graph::Environment::default(),
        );
        let mut plan = checked.plan.expect("disagg.toml is valid");
        for s in sets {
            dynamo_graph::overrides::apply(&mut plan, s).expect("valid override");
        }
        plan
    }

    #[test]
    fn no_endpoint_no_export() {
        assert_eq!(from_plan(&plan(&[]), "pipeline"), None);
    }

    #[test]
    fn each_node_is_its_own_service() {
        let p = plan(&["telemetry.otlp_endpoint=http://127.0.0.1:4317"]);
        let pipeline = from_plan(&p, "pipeline").expect("exports");
        assert_eq!(pipeline.instance, "pipeline");
        let mut services: Vec<&str> = pipeline
            .services_by_target
            .iter()
            .map(|(_, s)| s.as_str())
            .collect();
        services.sort_unstable();
        assert_eq!(services, ["frontend", "preprocessor", "router"]);
        let prefill = from_plan(&p, "prefill-0").expect("exports");
        assert_eq!(prefill.service, "prefill");
        assert!(prefill.services_by_target.is_empty());
    }
}
