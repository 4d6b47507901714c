//! Names and addresses every process derives from the plan alone, so no discovery service
//! is needed on one machine: the controller knows every address it started.

use std::path::{Path, PathBuf};

use dynamo_graph::plan::ReplicaId;

/// The endpoint of one input port of one replica on its process's socket: `node/index/port`.
pub fn endpoint(replica: &ReplicaId, port: &str) -> String {
    format!("{}/{}/{port}", replica.node, replica.index)
}

/// The endpoint every process serves its metrics text on.
pub const METRICS_ENDPOINT: &str = "_metrics";

/// The Unix socket of a process.
pub fn socket_path(run_dir: &Path, process: &str) -> PathBuf {
    let safe: String = process
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    run_dir.join(format!("{safe}.sock"))
}

/// A stable instance id for a replica (used by routers and in KV events).
pub fn instance_id(replica: &ReplicaId) -> u64 {
    fnv1a(
        (replica.node.bytes())
            .chain([b'/'])
            .chain(replica.index.to_le_bytes()),
    )
}

/// A stable id for a process, by name (its metrics' instance on NATS).
pub fn process_instance(process: &str) -> u64 {
    fnv1a(process.bytes())
}

/// FNV-1a: stable across processes and runs, unlike std's RandomState.
fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325, |h: u64, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = ReplicaId {
            node: "worker".into(),
            index: 0,
        };
        let b = ReplicaId {
            node: "worker".into(),
            index: 1,
        };
        assert_eq!(instance_id(&a), instance_id(&a.clone()));
        assert_ne!(instance_id(&a), instance_id(&b));
        assert_eq!(process_instance("prefill-0"), process_instance("prefill-0"));
        assert_ne!(process_instance("prefill-0"), process_instance("prefill-1"));
        assert_eq!(endpoint(&b, "in"), "worker/1/in");
        assert_eq!(
            socket_path(Path::new("/r"), "pipeline@m 1"),
            PathBuf::from("/r/pipeline_m_1.sock")
        );
    }
}
