//! A transport for every link of every edge, from where its two replicas landed and the
//! memory domain of its ports: same process → in-process; same machine → local socket
//! (shared memory or CUDA IPC for KV blocks); across machines → NATS (KV blocks over
//! TCP). An explicit choice that cannot work is an error that says why.

use std::collections::HashMap;

use crate::diagnostic::{Code, Diagnostic};
use crate::kinds::{Memory, KV_BLOCKS};
use crate::plan::{Link, Plan, PlannedEdge, PlannedReplica, PortRef, Transport};
use crate::spec::TransportChoice;
use crate::validate::resolve::Resolved;
use crate::validate::types::memory_of;

pub fn plan_edges(
    r: &Resolved<'_>,
    plan: &Plan,
    diags: &mut Vec<Diagnostic>,
) -> Option<Vec<PlannedEdge>> {
    let mut by_node: HashMap<&str, Vec<&PlannedReplica>> = HashMap::new();
    for rep in &plan.replicas {
        by_node.entry(rep.id.node.as_str()).or_default().push(rep);
    }
    let machine_gpus: HashMap<&str, u32> = plan
        .machines
        .iter()
        .map(|m| (m.name.as_str(), m.gpus))
        .collect();
    let mut edges = Vec::with_capacity(r.edges.len());
    let mut ok = true;
    let mut sorted: Vec<_> = r.edges.iter().collect();
    sorted.sort_by_key(|e| e.index);
    for e in sorted {
        let spec = &r.spec.edges[e.index];
        let (fnode, tnode) = (&r.spec.nodes[e.from.node], &r.spec.nodes[e.to.node]);
        let from_reps = by_node
            .get(fnode.name.value.as_str())
            .map_or(&[][..], |v| v.as_slice());
        let to_reps = by_node
            .get(tnode.name.value.as_str())
            .map_or(&[][..], |v| v.as_slice());
        let kv = e.from.port.schema == KV_BLOCKS;
        let memory = memory_of(e.from.port, fnode);
        let requested = spec.transport.value;
        let mut links = Vec::with_capacity(from_reps.len() * to_reps.len());
        let mut error: Option<Diagnostic> = None;
        for a in from_reps {
            for b in to_reps {
                let same_process = a.process == b.process;
                let same_machine = a.machine == b.machine;
                let auto = if same_process {
                    Transport::InProcess
                } else if same_machine {
                    match (kv, memory) {
                        (true, Memory::Cuda) => Transport::CudaIpc,
                        (true, Memory::Host) => Transport::Shm,
                        _ => Transport::Socket,
                    }
                } else if kv {
                    Transport::Tcp
                } else {
                    Transport::Nats
                };
                let t = match requested {
                    TransportChoice::Auto => auto,
                    TransportChoice::InProcess => Transport::InProcess,
                    TransportChoice::Socket => Transport::Socket,
                    TransportChoice::Nats => Transport::Nats,
                    TransportChoice::Shm => Transport::Shm,
                    TransportChoice::CudaIpc => Transport::CudaIpc,
                    TransportChoice::Tcp => Transport::Tcp,
                };
                if error.is_none() {
                    let ctx = LinkCtx {
                        a,
                        b,
                        kv,
                        memory,
                        gpus: machine_gpus.get(a.machine.as_str()).copied().unwrap_or(0),
                        nats: plan.nats.is_some(),
                    };
                    error = check_link(t, requested, &ctx, r, e.index);
                }
                links.push(Link {
                    from: a.id.index,
                    to: b.id.index,
                    transport: t,
                });
            }
        }
        if let Some(d) = error {
            diags.push(d);
            ok = false;
            continue;
        }
        let why = why(requested, &links);
        edges.push(PlannedEdge {
            from: PortRef {
                node: fnode.name.value.clone(),
                port: e.from.port.name.to_string(),
            },
            to: PortRef {
                node: tnode.name.value.clone(),
                port: e.to.port.name.to_string(),
            },
            kind: spec.kind.value,
            schema: e.from.port.schema.to_string(),
            memory,
            requested,
            queue_size: spec.queue_size,
            timeout_ms: spec
                .timeout
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            links,
            why,
        });
    }
    ok.then_some(edges)
}

struct LinkCtx<'p> {
    a: &'p PlannedReplica,
    b: &'p PlannedReplica,
    kv: bool,
    memory: Memory,
    /// GPUs of the source machine.
    gpus: u32,
    nats: bool,
}

fn check_link(
    t: Transport,
    requested: TransportChoice,
    c: &LinkCtx<'_>,
    r: &Resolved<'_>,
    edge: usize,
) -> Option<Diagnostic> {
    let spec = &r.spec.edges[edge];
    let span = if requested == TransportChoice::Auto {
        spec.span
    } else {
        spec.transport.span
    };
    let between = format!(
        "`{}` (process `{}` on `{}`) and `{}` (process `{}` on `{}`)",
        c.a.id, c.a.process, c.a.machine, c.b.id, c.b.process, c.b.machine
    );
    let same_machine = c.a.machine == c.b.machine;
    let d = match t {
        Transport::InProcess if c.a.process != c.b.process => Diagnostic::at(Code::E0401, span, format!("an in-process edge cannot connect {between}"))
            .label("`in-process` needs one process")
            .help("use `transport = \"auto\"`, or put both nodes in one process with the same `process = \"…\"`"),
        Transport::Socket | Transport::Shm | Transport::CudaIpc if !same_machine => Diagnostic::at(Code::E0402, span, format!("`{}` works only within one machine, but this edge connects {between}", t.as_str()))
            .label(format!("`{}` across machines", t.as_str()))
            .help(if c.kv { "use `transport = \"tcp\"` (or `auto`) for KV blocks across machines" } else { "use `transport = \"nats\"` (or `auto`) across machines" }),
        Transport::Shm | Transport::CudaIpc | Transport::Tcp if !c.kv => Diagnostic::at(Code::E0405, span, format!("`{}` carries KV blocks only, not `{}` messages", t.as_str(), spec_schema(r, edge)))
            .label(format!("`{}` on a message edge", t.as_str()))
            .help("use `auto`, `in-process`, `socket` or `nats` for requests and events"),
        Transport::Nats if c.kv => Diagnostic::at(Code::E0405, span, "KV blocks do not travel over NATS")
            .label("`nats` on a KV edge")
            .help("use `transport = \"tcp\"` (or `auto`): KV blocks go over a direct data connection"),
        Transport::Shm if c.memory == Memory::Cuda => Diagnostic::at(Code::E0405, span, "shared memory carries host memory, but these KV blocks live on a GPU")
            .label("`shm` on a cuda port")
            .help("use `transport = \"cuda-ipc\"` (or `auto`)"),
        Transport::CudaIpc if c.memory != Memory::Cuda || c.gpus == 0 => {
            let why = if c.gpus == 0 { format!("machine `{}` has no GPUs", c.a.machine) } else { "these KV blocks live in host memory".to_string() };
            Diagnostic::at(Code::E0403, span, format!("CUDA IPC needs GPU memory, but {why}"))
                .label("`cuda-ipc` without GPU memory")
                .help("use `transport = \"shm\"` (or `auto`), or set `device = \"cuda\"` with `gpus` on both nodes")
        }
        Transport::Nats if !c.nats && same_machine => Diagnostic::at(Code::E0404, span, format!("this edge asks for NATS ({between}) but no NATS server is configured"))
            .label("needs NATS")
            .help("pass `--nats nats://HOST:4222` to `dynamo graph up`, set `nats = \"nats://HOST:4222\"` in [cluster], or use `transport = \"auto\"`"),
        Transport::Nats if !c.nats => Diagnostic::at(Code::E0404, span, format!("this edge crosses machines ({between}) but no NATS server is configured"))
            .label("needs NATS")
            .help("set `nats = \"nats://HOST:4222\"` in [cluster], or place both nodes on one machine"),
        _ => return None,
    };
    Some(d)
}

fn spec_schema(r: &Resolved<'_>, edge: usize) -> &'static str {
    r.edges
        .iter()
        .find(|e| e.index == edge)
        .map_or("?", |e| e.from.port.schema)
}

fn why(requested: TransportChoice, links: &[Link]) -> String {
    if requested != TransportChoice::Auto {
        return "requested in the file".into();
    }
    let mut t: Vec<Transport> = links.iter().map(|l| l.transport).collect();
    t.sort_unstable();
    t.dedup();
    let reasons: Vec<&str> = t
        .iter()
        .map(|t| match t {
            Transport::InProcess => "same process",
            Transport::Socket => "same machine",
            Transport::Shm => "same machine, host memory",
            Transport::CudaIpc => "same machine, GPU memory",
            Transport::Nats => "across machines",
            Transport::Tcp => "KV blocks across machines",
        })
        .collect();
    if reasons.is_empty() {
        "no replicas".into()
    } else {
        reasons.join("; ")
    }
}
