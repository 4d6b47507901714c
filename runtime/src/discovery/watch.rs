//! Follows every key under a prefix: a snapshot first, then the changes. When etcd goes
//! away the last snapshot stays in force (routing goes on with the instances it knew);
//! when it is back the watcher reads the prefix again and carries on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::etcd::{EtcdClient, WatchEvent};

/// Every key under the prefix and its value, sorted by key.
pub type Snapshot = Arc<BTreeMap<String, Vec<u8>>>;

/// A running watch; dropping it stops it.
pub struct PrefixWatch {
    snapshots: watch::Receiver<Snapshot>,
    stop: CancellationToken,
}

impl PrefixWatch {
    pub fn start(client: EtcdClient, prefix: impl Into<String>) -> Self {
        let (tx, snapshots) = watch::channel(Snapshot::default());
        let stop = CancellationToken::new();
        tokio::spawn(follow(client, prefix.into(), tx, stop.clone()));
        PrefixWatch { snapshots, stop }
    }

    /// The keys now, updated as they change.
    pub fn snapshots(&self) -> watch::Receiver<Snapshot> {
        self.snapshots.clone()
    }

    pub fn current(&self) -> Snapshot {
        self.snapshots.borrow().clone()
    }
}

impl Drop for PrefixWatch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn follow(
    client: EtcdClient,
    prefix: String,
    tx: watch::Sender<Snapshot>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let round = async {
            let (kvs, revision) = client.range_prefix(&prefix).await?;
            let mut keys: BTreeMap<String, Vec<u8>> =
                kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
            tx.send_if_modified(|current| {
                let changed = **current != keys;
                if changed {
                    *current = Arc::new(keys.clone());
                }
                changed
            });
            let mut changes = Box::pin(client.watch_prefix(&prefix, revision + 1).await?);
            backoff.reset();
            while let Some(batch) = changes.next().await {
                for event in batch? {
                    match event {
                        WatchEvent::Put(kv) => keys.insert(kv.key, kv.value),
                        WatchEvent::Delete(key) => keys.remove(&key),
                    };
                }
                tx.send_replace(Arc::new(keys.clone()));
            }
            Err(super::DiscoveryError::Unreachable(
                "watch stream ended".into(),
            ))
        };
        let result: Result<(), super::DiscoveryError> = tokio::select! {
            _ = stop.cancelled() => return,
            r = round => r,
        };
        if let Err(e) = result {
            tracing::debug!(prefix = %prefix, error = %e, "etcd watch interrupted; resyncing");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
