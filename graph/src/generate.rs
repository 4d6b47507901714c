//! Generated graphs for benchmarks and property tests: valid by construction (a DAG of
//! routers fanning out to workers), any size, deterministic for a seed.

use std::collections::HashSet;
use std::fmt::Write as _;

/// A small deterministic generator (xorshift64*), so this crate needs no RNG dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The edges of a generated graph, as `(from, to)` port references, in file order.
pub struct Generated {
    pub text: String,
    pub routers: usize,
    pub workers: usize,
    /// `(from router, to router)` indexes of router → router edges.
    pub router_edges: Vec<(usize, usize)>,
}

/// A valid graph of about `nodes` nodes and `edges` call edges on `machines` machines.
pub fn large_graph(nodes: usize, edges: usize, machines: usize) -> String {
    generate(nodes, edges, machines, 0x5eed).text
}

pub fn generate(nodes: usize, edges: usize, machines: usize, seed: u64) -> Generated {
    let mut rng = Rng(seed | 1);
    let nodes = nodes.max(4);
    let machines = machines.max(1);
    let routers = (nodes / 10).max(1);
    let workers = nodes - 2 - routers;
    let mut t = String::with_capacity(nodes * 120 + edges * 60);
    t.push_str("[graph]\nname = \"generated\"\n\n[models.m]\npath = \"/models/m.gguf\"\n\n");
    t.push_str("[cluster]\nnats = \"nats://127.0.0.1:4222\"\n\n");
    // Every other worker holds a GPU; give the machines room for all of them.
    let gpus_per_machine = (workers / 2 + 1).div_ceil(machines).max(8);
    for m in 0..machines {
        let _ = writeln!(
            t,
            "[cluster.machines.m{m}]\naddress = \"10.1.{}.{}\"\ngpus = {gpus_per_machine}\nlabels = {{ zone = \"z{}\" }}\n",
            m / 250,
            m % 250,
            m % 4
        );
    }
    t.push_str("[nodes.fe]\nkind = \"frontend\"\nport = 0\n\n[nodes.pre]\nkind = \"preprocessor\"\nmodel = \"m\"\n\n");
    for r in 0..routers {
        let _ = writeln!(t, "[nodes.r{r}]\nkind = \"router\"\n");
    }
    for w in 0..workers {
        let gpus = w % 2;
        let _ = writeln!(
            t,
            "[nodes.w{w}]\nkind = \"worker\"\nengine = \"mocker\"\nmodel = \"m\"\ngpus = {gpus}\n"
        );
    }
    let mut seen: HashSet<(usize, usize, bool)> = HashSet::new();
    let mut lines: Vec<String> = vec!["fe -> pre".into(), "pre -> r0".into()];
    let mut router_edges = Vec::new();
    // A chain keeps every router reachable; each worker gets one router.
    for r in 1..routers {
        let from = rng.below(r);
        seen.insert((from, r, true));
        router_edges.push((from, r));
        lines.push(format!("r{from} -> r{r}"));
    }
    for w in 0..workers {
        let r = w % routers;
        seen.insert((r, w, false));
        lines.push(format!("r{r} -> w{w}"));
    }
    let mut attempts = 0;
    while lines.len() < edges && attempts < edges * 4 {
        attempts += 1;
        if routers > 1 && rng.below(2) == 0 {
            let a = rng.below(routers);
            let b = rng.below(routers);
            let (a, b) = (a.min(b), a.max(b));
            if a != b && seen.insert((a, b, true)) {
                router_edges.push((a, b));
                lines.push(format!("r{a} -> r{b}"));
            }
        } else if workers > 0 {
            let r = rng.below(routers);
            let w = rng.below(workers);
            if seen.insert((r, w, false)) {
                lines.push(format!("r{r} -> w{w}"));
            }
        }
    }
    for l in &lines {
        let _ = writeln!(
            t,
            "[[edges]]\nfrom = \"{}\"\nto = \"{}\"\n",
            l.split(" -> ").next().unwrap_or(""),
            l.split(" -> ").nth(1).unwrap_or("")
        );
    }
    Generated {
        text: t,
        routers,
        workers,
        router_edges,
    }
}
