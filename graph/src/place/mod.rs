//! Placement: a deterministic assignment of every replica to a machine, GPU ids and a
//! process, honouring GPU counts, pins, label selectors and colocation. Then a transport
//! for every edge ([`transport`]). The result is the [`Plan`].

pub mod transport;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::diagnostic::{Code, Diagnostic};
use crate::plan::{
    Plan, PlannedMachine, PlannedModel, PlannedNode, PlannedProcess, PlannedReplica, ReplicaId,
};
use crate::spec::{GraphSpec, NodeSpec};
use crate::validate::resolve::Resolved;

/// What the planner needs to know about where it runs when the file has no `[cluster]`.
#[derive(Debug, Clone)]
pub struct Environment {
    /// The name this machine gets in plans.
    pub machine_name: String,
    /// GPUs on this machine.
    pub gpus: u32,
    /// A NATS URL given on the command line (`graph up --nats`): it overrides the file's
    /// `[cluster] nats` and counts as configured when transports are checked.
    pub nats: Option<String>,
    /// Engines the running binary was built without (cargo features): a node that asks
    /// for one is E0306 before anything starts.
    pub missing_engines: Vec<String>,
}

impl Default for Environment {
    fn default() -> Self {
        Environment {
            machine_name: "local".into(),
            gpus: 0,
            nats: None,
            missing_engines: Vec::new(),
        }
    }
}

/// The machines of the cluster, in file order.
pub fn machines(spec: &GraphSpec, env: &Environment) -> Vec<PlannedMachine> {
    match &spec.cluster {
        Some(c) if !c.machines.is_empty() => c
            .machines
            .iter()
            .map(|m| PlannedMachine {
                name: m.name.value.clone(),
                address: m.address.clone(),
                gpus: m.gpus.value,
                labels: m.labels.clone(),
            })
            .collect(),
        _ => vec![PlannedMachine {
            name: env.machine_name.clone(),
            address: "127.0.0.1".into(),
            gpus: env.gpus,
            labels: BTreeMap::new(),
        }],
    }
}

struct State {
    free: Vec<Vec<bool>>,
    free_count: Vec<u32>,
    replicas_on: Vec<u32>,
    /// Machines by (replicas placed, index) and by (most free GPUs, index), so an
    /// unconstrained replica finds its machine in O(log machines).
    by_load: BTreeSet<(u32, usize)>,
    by_free: BTreeSet<(std::cmp::Reverse<u32>, usize)>,
}

impl State {
    fn free_count(&self, m: usize) -> u32 {
        self.free_count[m]
    }

    fn new(machines: &[PlannedMachine]) -> Self {
        State {
            free: machines
                .iter()
                .map(|m| vec![true; m.gpus as usize])
                .collect(),
            free_count: machines.iter().map(|m| m.gpus).collect(),
            replicas_on: vec![0; machines.len()],
            by_load: (0..machines.len()).map(|m| (0, m)).collect(),
            by_free: machines
                .iter()
                .enumerate()
                .map(|(i, m)| (std::cmp::Reverse(m.gpus), i))
                .collect(),
        }
    }

    /// The best machine for a replica that may go anywhere: the most free GPUs when it
    /// needs some, else the fewest replicas; ties to the first machine.
    fn best_anywhere(&self, gpus: u32) -> Option<usize> {
        if gpus > 0 {
            self.by_free
                .iter()
                .next()
                .filter(|(std::cmp::Reverse(f), _)| *f >= gpus)
                .map(|&(_, m)| m)
        } else {
            self.by_load.iter().next().map(|&(_, m)| m)
        }
    }

    fn take(&mut self, m: usize, n: u32) -> Vec<u32> {
        self.by_load.remove(&(self.replicas_on[m], m));
        self.by_free
            .remove(&(std::cmp::Reverse(self.free_count[m]), m));
        let mut got = Vec::with_capacity(n as usize);
        for (i, f) in self.free[m].iter_mut().enumerate() {
            if got.len() as u32 == n {
                break;
            }
            if *f {
                *f = false;
                got.push(i as u32);
            }
        }
        self.replicas_on[m] += 1;
        self.free_count[m] -= got.len() as u32;
        self.by_load.insert((self.replicas_on[m], m));
        self.by_free
            .insert((std::cmp::Reverse(self.free_count[m]), m));
        got
    }
}

/// Nodes in an order where every colocation target comes before the nodes colocated
/// with it; colocation cycles are reported.
fn colocation_order(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) -> Option<Vec<usize>> {
    let n = r.spec.nodes.len();
    let target = |i: usize| -> Option<usize> {
        r.spec.nodes[i]
            .placement
            .colocate_with
            .as_ref()
            .and_then(|c| r.node_index.get(c.value.as_str()).copied())
            .filter(|&t| t != i)
    };
    let mut state = vec![0u8; n]; // 0 new, 1 on stack, 2 done
    let mut order = Vec::with_capacity(n);
    let mut ok = true;
    for start in 0..n {
        let mut path = Vec::new();
        let mut cur = Some(start);
        while let Some(c) = cur {
            match state[c] {
                2 => break,
                1 => {
                    let node = &r.spec.nodes[c];
                    let span = node
                        .placement
                        .colocate_with
                        .as_ref()
                        .map_or(node.name.span, |s| s.span);
                    diags.push(
                        Diagnostic::at(Code::E0503, span, format!("colocation of `{}` goes round in a circle", node.name.value))
                            .label("each node here is colocated with the next")
                            .help("one node of the circle must be placed on its own: remove one `colocate_with`"),
                    );
                    ok = false;
                    break;
                }
                _ => {
                    state[c] = 1;
                    path.push(c);
                    cur = target(c);
                }
            }
        }
        for &p in path.iter().rev() {
            state[p] = 2;
            order.push(p);
        }
    }
    ok.then_some(order)
}

fn matches(node: &NodeSpec, m: &PlannedMachine) -> bool {
    node.placement
        .machine
        .as_ref()
        .is_none_or(|p| p.value == m.name)
        && node
            .placement
            .labels
            .iter()
            .all(|(k, v)| m.labels.get(&k.value) == Some(&v.value))
}

/// Place every replica; `None` when something does not fit (diagnostics say what).
pub fn place(r: &Resolved<'_>, env: &Environment, diags: &mut Vec<Diagnostic>) -> Option<Plan> {
    let spec = r.spec;
    let machines = machines(spec, env);
    let order = colocation_order(r, diags)?;
    let mut st = State::new(&machines);
    let mut placed: Vec<Vec<(usize, Vec<u32>, String)>> = vec![Vec::new(); spec.nodes.len()];
    let mut failed = false;
    for &i in &order {
        let node = &spec.nodes[i];
        if r.kind(i).is_none() {
            continue;
        }
        let unconstrained = node.placement.machine.is_none() && node.placement.labels.is_empty();
        let eligible: Vec<usize> = (0..machines.len())
            .filter(|&m| matches(node, &machines[m]))
            .collect();
        if eligible.is_empty() {
            diags.push(no_machine(node, &machines));
            failed = true;
            continue;
        }
        let colocate = node
            .placement
            .colocate_with
            .as_ref()
            .and_then(|c| r.node_index.get(c.value.as_str()).map(|&t| (t, c)));
        let mut count_on: HashMap<usize, u32> = HashMap::new();
        for rep in 0..node.replicas.value {
            let gpus = node.gpus.value;
            let (choice, why) = if let Some((t, c)) = colocate {
                let Some((tm, _, _)) = placed[t].get(rep as usize % placed[t].len().max(1)) else {
                    failed = true;
                    break;
                };
                let tm = *tm;
                if !eligible.contains(&tm) {
                    diags.push(
                        Diagnostic::at(Code::E0503, c.span, format!("`{}` must be colocated with `{}`, but that machine (`{}`) does not match its placement", node.name.value, c.value, machines[tm].name))
                            .label("colocated here")
                            .help("make the pin or labels of both nodes agree"),
                    );
                    failed = true;
                    break;
                }
                if st.free_count(tm) < gpus {
                    diags.push(
                        Diagnostic::at(Code::E0503, node.gpus.span, format!(
                            "replica {rep} of `{}` needs {gpus} GPU{} on `{}` (colocated with `{}`), which has {} free",
                            node.name.value, plural(gpus), machines[tm].name, c.value, st.free_count(tm)
                        ))
                        .label(format!("{gpus} GPU{} per replica", plural(gpus)))
                        .with_label(c.span, "colocation decides the machine")
                        .help("lower `gpus`, or give that machine more GPUs, or drop `colocate_with`"),
                    );
                    failed = true;
                    break;
                }
                (
                    tm,
                    format!(
                        "colocated with {}/{}",
                        c.value,
                        rep as usize % placed[t].len().max(1)
                    ),
                )
            } else {
                let fast = if unconstrained && count_on.is_empty() {
                    st.best_anywhere(gpus)
                } else {
                    None
                };
                let best = fast.or_else(|| {
                    eligible
                        .iter()
                        .copied()
                        .filter(|&m| st.free_count(m) >= gpus)
                        .min_by_key(|&m| {
                            let mine = if count_on.is_empty() {
                                0
                            } else {
                                count_on.get(&m).copied().unwrap_or(0)
                            };
                            if gpus > 0 {
                                (mine, u32::MAX - st.free_count(m), m)
                            } else {
                                (mine, st.replicas_on[m], m)
                            }
                        })
                });
                let Some(m) = best else {
                    diags.push(no_gpus(node, rep, &eligible, &machines, &st));
                    failed = true;
                    break;
                };
                (m, why_here(node, gpus, &machines[m], st.free_count(m)))
            };
            let ids = st.take(choice, gpus);
            *count_on.entry(choice).or_default() += 1;
            placed[i].push((choice, ids, why));
        }
    }
    if failed {
        return None;
    }
    let multi = machines.len() > 1;
    let mut replicas = Vec::new();
    let mut processes: BTreeMap<String, PlannedProcess> = BTreeMap::new();
    for (i, node) in spec.nodes.iter().enumerate() {
        let Some(kind) = r.kind(i) else { continue };
        for (rep, (m, gpus, why)) in placed[i].iter().enumerate() {
            let machine = &machines[*m].name;
            let process = match (&node.process, kind.engine) {
                (None, true) => format!("{}-{rep}", node.name.value),
                (group, _) => {
                    let g = group.as_ref().map_or("pipeline", |g| g.value.as_str());
                    if multi {
                        format!("{g}@{machine}")
                    } else {
                        g.to_string()
                    }
                }
            };
            let id = ReplicaId {
                node: node.name.value.clone(),
                index: rep as u32,
            };
            processes
                .entry(process.clone())
                .or_insert_with(|| PlannedProcess {
                    name: process.clone(),
                    machine: machine.clone(),
                    replicas: Vec::new(),
                })
                .replicas
                .push(id.clone());
            replicas.push(PlannedReplica {
                id,
                machine: machine.clone(),
                gpus: gpus.clone(),
                process,
                why: why.clone(),
            });
        }
    }
    check_http_ports(r, &replicas, diags);
    let mut plan = Plan {
        graph: spec.name.value.clone(),
        namespace: spec.namespace.clone(),
        nats: env.nats.clone().or_else(|| {
            spec.cluster
                .as_ref()
                .and_then(|c| c.nats.as_ref())
                .map(|s| s.value.clone())
        }),
        etcd: spec
            .cluster
            .as_ref()
            .and_then(|c| c.etcd.as_ref())
            .map(|s| s.value.clone()),
        machines,
        models: spec
            .models
            .iter()
            .map(|m| PlannedModel {
                name: m.name.value.clone(),
                served_name: m.served_name.clone(),
                source: m.source.clone(),
                system_prompt: m.system_prompt.clone(),
                chat_template: m.chat_template.clone(),
                context_length: m.context_length,
            })
            .collect(),
        nodes: planned_nodes(r),
        replicas,
        processes: processes.into_values().collect(),
        edges: Vec::new(),
        telemetry: spec.telemetry.clone(),
        admin: spec.admin.clone(),
    };
    plan.edges = transport::plan_edges(r, &plan, diags)?;
    Some(plan)
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn why_here(node: &NodeSpec, gpus: u32, m: &PlannedMachine, free: u32) -> String {
    let mut why = Vec::new();
    if node.placement.machine.is_some() {
        why.push("pinned".to_string());
    }
    if !node.placement.labels.is_empty() {
        let l: Vec<String> = node
            .placement
            .labels
            .iter()
            .map(|(k, v)| format!("{}={}", k.value, v.value))
            .collect();
        why.push(format!("labels {}", l.join(",")));
    }
    if gpus > 0 {
        why.push(format!("gpus={gpus}, {free} of {} free", m.gpus));
    } else if why.is_empty() {
        why.push("least loaded".to_string());
    }
    why.join("; ")
}

fn no_machine(node: &NodeSpec, machines: &[PlannedMachine]) -> Diagnostic {
    let span = node
        .placement
        .machine
        .as_ref()
        .map(|m| m.span)
        .or_else(|| node.placement.labels.first().map(|(k, _)| k.span))
        .unwrap_or(node.name.span);
    let listing: Vec<String> = machines
        .iter()
        .map(|m| {
            let l: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!(
                "`{}` ({})",
                m.name,
                if l.is_empty() {
                    "no labels".to_string()
                } else {
                    l.join(", ")
                }
            )
        })
        .collect();
    Diagnostic::at(
        Code::E0502,
        span,
        format!("no machine matches the placement of `{}`", node.name.value),
    )
    .label("no machine has all of this")
    .help(format!("machines: {}", listing.join("; ")))
}

fn no_gpus(
    node: &NodeSpec,
    rep: u32,
    eligible: &[usize],
    machines: &[PlannedMachine],
    st: &State,
) -> Diagnostic {
    let gpus = node.gpus.value;
    let (best, free) = eligible
        .iter()
        .map(|&m| (m, st.free_count(m)))
        .max_by_key(|&(m, f)| (f, std::cmp::Reverse(m)))
        .unwrap_or((0, 0));
    let total = eligible
        .iter()
        .map(|&m| machines[m].gpus)
        .max()
        .unwrap_or(0);
    let name = machines.get(best).map_or("?", |m| m.name.as_str());
    let msg = if total < gpus {
        format!(
            "`{}` needs {gpus} GPU{} per replica; the most any machine has is {total} (`{name}`)",
            node.name.value,
            plural(gpus)
        )
    } else if rep == 0 {
        format!("`{}` needs {gpus} GPU{} per replica; the most free on any machine is {free} (`{name}`)", node.name.value, plural(gpus))
    } else {
        format!(
            "`{}` needs {gpus} GPU{} for each of {} replicas; only {rep} fit (most free now: {free} on `{name}`)",
            node.name.value,
            plural(gpus),
            node.replicas.value
        )
    };
    Diagnostic::at(Code::E0501, node.gpus.span, msg)
        .label(format!("{gpus} GPU{} per replica", plural(gpus)))
        .with_label(
            node.replicas.span,
            format!(
                "{} replica{}",
                node.replicas.value,
                plural(node.replicas.value)
            ),
        )
        .help("lower `gpus` or `replicas`, or add machines with GPUs to [cluster]")
}

/// Two frontends on one machine cannot listen on the same port.
fn check_http_ports(r: &Resolved<'_>, replicas: &[PlannedReplica], diags: &mut Vec<Diagnostic>) {
    let mut used: BTreeMap<(String, i64), String> = BTreeMap::new();
    for rep in replicas {
        let Some(&i) = r.node_index.get(rep.id.node.as_str()) else {
            continue;
        };
        if r.kind(i).is_none_or(|k| k.name != "frontend") {
            continue;
        }
        let node = &r.spec.nodes[i];
        let port = node
            .settings
            .get("port")
            .and_then(|v| v.value.as_i64())
            .unwrap_or(8000);
        if port == 0 {
            continue;
        }
        let key = (rep.machine.clone(), port);
        if let Some(first) = used.get(&key) {
            diags.push(
                Diagnostic::at(Code::E0504, node.setting_span("port").unwrap_or(node.name.span), format!("{} and {first} would both listen on port {port} of `{}`", rep.id, rep.machine))
                    .label(format!("port {port}"))
                    .help("give each frontend its own `port`, use `port = 0` for a free one, or place them on different machines"),
            );
        } else {
            used.insert(key, rep.id.to_string());
        }
    }
}

/// Settings with defaults filled in, so the plan says everything explicitly.
fn planned_nodes(r: &Resolved<'_>) -> Vec<PlannedNode> {
    // Parse each catalogue default once, not once per node.
    let mut defaults: HashMap<&'static str, Option<serde_json::Value>> = HashMap::new();
    r.spec
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let kind = r.kind(i)?;
            let engine = n.setting_str("engine");
            let mut settings = BTreeMap::new();
            for f in kind.settings {
                let by_engine = crate::kinds::ENGINE_DEFAULTS
                    .iter()
                    .find(|(e, key, _)| Some(*e) == engine && *key == f.key)
                    .map(|(_, _, d)| *d);
                let v = match n.settings.get(f.key) {
                    Some(v) => Some(v.value.clone()),
                    None => by_engine.or(f.default).and_then(|d| {
                        defaults
                            .entry(d)
                            .or_insert_with(|| crate::fields::default_json(d))
                            .clone()
                    }),
                };
                if let Some(v) = v {
                    settings.insert(f.key.to_string(), v);
                }
            }
            Some(PlannedNode {
                name: n.name.value.clone(),
                kind: kind.name.to_string(),
                replicas: n.replicas.value,
                gpus: n.gpus.value,
                restart: n.restart.clone(),
                settings,
                placement: crate::plan::PlannedPlacement {
                    machine: n.placement.machine.as_ref().map(|m| m.value.clone()),
                    labels: (n.placement.labels.iter())
                        .map(|(k, v)| (k.value.clone(), v.value.clone()))
                        .collect(),
                    colocate_with: n.placement.colocate_with.as_ref().map(|c| c.value.clone()),
                },
            })
        })
        .collect()
}
