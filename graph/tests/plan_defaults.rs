//! Settings a file leaves out get the catalogue's default, or the engine's own where it
//! differs (llama.cpp allocates its whole KV cache at start).

use std::path::PathBuf;

use dynamo_graph::{check, Environment, SourceFile};

fn settings(file: &str, node: &str) -> serde_json::Map<String, serde_json::Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("example graph");
    let c = check(SourceFile::new(file, text), &Environment::default());
    let plan = c.plan.expect("plans");
    let n = plan.nodes.iter().find(|n| n.name == node).expect("node");
    n.settings.clone().into_iter().collect()
}

#[test]
fn llamacpp_nodes_get_their_engine_defaults_and_others_the_catalogues() {
    let llama = settings("graphs/llamacpp_disagg.toml", "decode");
    assert_eq!(llama["engine"], "llamacpp");
    assert_eq!(llama["num_blocks"], 1024);
    assert_eq!(llama["max_num_seqs"], 64);
    assert_eq!(llama["max_batched_tokens"], 512);
    let native = settings("graphs/disagg.toml", "decode");
    assert_eq!(native["engine"], "native");
    assert_eq!(native["num_blocks"], 8192);
    assert_eq!(native["max_num_seqs"], 256);
    // A value the file gives wins over the engine's default.
    let explicit = settings("graphs/llamacpp.toml", "worker");
    assert_eq!(explicit["num_blocks"], 512);
    assert_eq!(explicit["max_num_seqs"], 32);
}
