//! `dynamo graph validate|plan|viz|schema`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use dynamo_graph::{render, Checked, Code, Diagnostic, Diagnostics, Environment, SourceFile};

/// Exit status for a graph with errors (1 is for everything else that fails).
pub const INVALID: u8 = 2;

#[derive(Subcommand)]
pub enum GraphCommand {
    /// Check a graph file and report every problem at once, or "ok".
    Validate {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = DiagFormat::Text)]
        format: DiagFormat,
        /// Treat warnings as errors.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Show which replica runs where, in which process, and the transport of each edge.
    Plan {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
    },
    /// Draw the graph (as placed, when it is valid; broken parts marked when it is not).
    Viz {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = VizFormat::Dot)]
        format: VizFormat,
    },
    /// Print the JSON Schema of graph files (for editor completion, e.g. taplo).
    Schema,
    /// Serve the graph on this machine until Ctrl-C (or on the agents' machines, `--etcd`).
    Up(crate::cmd::up::UpArgs),
    /// Each process of a graph running on agents: machine, state, restarts, last error.
    Status {
        name: String,
        #[arg(long, value_name = "URL")]
        etcd: String,
        #[arg(long, default_value = "dynamo")]
        namespace: String,
    },
    /// Take down a graph running on agents.
    Down {
        name: String,
        #[arg(long, value_name = "URL")]
        etcd: String,
        #[arg(long, default_value = "dynamo")]
        namespace: String,
    },
    /// Live figures of a running graph in the terminal (nodes, edges), from its admin server.
    Top(crate::cmd::top::TopArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DiagFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PlanFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum VizFormat {
    Dot,
    Mermaid,
    Svg,
    Json,
}

/// The machine this command runs on, as the planner sees it without a `[cluster]`.
pub fn local_environment() -> Environment {
    // NVML, else the driver's `/proc` entries; narrowed by CUDA_VISIBLE_DEVICES.
    let gpus = dynamo_host::gpus::Gpus::detect().count;
    let machine_name = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "local".into());
    Environment {
        machine_name,
        gpus,
        nats: None,
        missing_engines: dynamo_host::nodes::missing_engines(),
    }
}

/// Read and check a graph file; an unreadable file is diagnostic E0009.
pub fn load(path: &Path) -> Checked {
    match dynamo_graph::read(path) {
        Ok(file) => dynamo_graph::check(file, &local_environment()),
        Err(e) => {
            let file = SourceFile::new(path.display().to_string(), String::new());
            let mut diagnostics = Diagnostics::default();
            diagnostics.push(
                Diagnostic::new(
                    Code::E0009,
                    None,
                    format!("cannot read {}: {e}", path.display()),
                )
                .help("check the path and its permissions"),
            );
            let (spec, _) = dynamo_graph::decode::decode("");
            Checked {
                file,
                spec,
                diagnostics,
                plan: None,
            }
        }
    }
}

fn print_diagnostics(c: &Checked) {
    if !c.diagnostics.items.is_empty() {
        eprint!("{}", render::render_text(&c.file, &c.diagnostics));
    }
}

pub fn run(cmd: GraphCommand, dyn_log: Option<String>) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        GraphCommand::Up(args) => {
            drop(out);
            crate::cmd::up::run(args, dyn_log)
        }
        GraphCommand::Status {
            name,
            etcd,
            namespace,
        } => {
            drop(out);
            crate::cmd::cluster::status(&name, &namespace, &etcd)
        }
        GraphCommand::Down {
            name,
            etcd,
            namespace,
        } => {
            drop(out);
            crate::cmd::cluster::down(&name, &namespace, &etcd)
        }
        GraphCommand::Top(args) => {
            drop(out);
            crate::cmd::top::run(args)
        }
        GraphCommand::Validate {
            file,
            format,
            deny_warnings,
        } => {
            let c = load(&file);
            let failed =
                c.diagnostics.has_errors() || (deny_warnings && !c.diagnostics.items.is_empty());
            match format {
                DiagFormat::Json => {
                    writeln!(out, "{}", render::render_json(&c.file, &c.diagnostics))?
                }
                DiagFormat::Text => {
                    print_diagnostics(&c);
                    if !failed {
                        writeln!(out, "ok: {}", summary(&c))?;
                    }
                }
            }
            Ok(exit(failed))
        }
        GraphCommand::Plan { file, format } => {
            let c = load(&file);
            print_diagnostics(&c);
            let Some(plan) = &c.plan else {
                return Ok(exit(true));
            };
            match format {
                PlanFormat::Text => write!(out, "{}", plan.to_text())?,
                PlanFormat::Json => writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(plan).context("serialising the plan")?
                )?,
            }
            Ok(ExitCode::SUCCESS)
        }
        GraphCommand::Viz { file, format } => {
            let c = load(&file);
            print_diagnostics(&c);
            if c.diagnostics.codes().contains(&Code::E0009) {
                return Ok(exit(true));
            }
            let drawing = dynamo_graph::viz::Drawing::new(&c);
            let text = match format {
                VizFormat::Dot => dynamo_graph::viz::dot::render(&drawing),
                VizFormat::Mermaid => dynamo_graph::viz::mermaid::render(&drawing),
                VizFormat::Json => dynamo_graph::viz::json::render(&drawing),
                VizFormat::Svg => dynamo_graph::viz::svg::render(&drawing),
            };
            write!(out, "{text}")?;
            Ok(ExitCode::SUCCESS)
        }
        GraphCommand::Schema => {
            writeln!(out, "{}", dynamo_graph::schema::json_schema_string())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn summary(c: &Checked) -> String {
    let (n, e) = (c.spec.nodes.len(), c.spec.edges.len());
    let mut s = format!(
        "{}: graph `{}`, {n} nodes, {e} edges",
        c.file.name, c.spec.name.value
    );
    if let Some(p) = &c.plan {
        s.push_str(&format!(
            ", {} replicas in {} processes",
            p.replicas.len(),
            p.processes.len()
        ));
    }
    let w = c.diagnostics.warning_count();
    if w > 0 {
        s.push_str(&format!(", {w} warning{}", if w == 1 { "" } else { "s" }));
    }
    s
}

fn exit(failed: bool) -> ExitCode {
    if failed {
        ExitCode::from(INVALID)
    } else {
        ExitCode::SUCCESS
    }
}
