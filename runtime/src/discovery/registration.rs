//! Keeps one key registered in etcd under a lease for as long as the process wants it.
//!
//! The key is refreshed every TTL/3. When etcd cannot be reached the keeper retries with
//! jittered backoff and changes nothing else; when etcd is back it either refreshes the
//! old lease or, if the lease expired or etcd lost its data, grants a new one and puts the
//! key again. An etcd outage therefore never restarts anything (Dynamo issue #3493): the
//! key is simply missing while etcd is, and back when etcd is.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::etcd::EtcdClient;
use super::DiscoveryError;

#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    /// Lease TTL: how long the key outlives a process that stops refreshing it.
    pub ttl: Duration,
    /// First and largest retry delay while etcd is unreachable (jittered).
    pub retry_base: Duration,
    pub retry_max: Duration,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        RegistrationConfig {
            ttl: Duration::from_secs(10),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// Where a registration stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrationStatus {
    /// The key is in etcd under a live lease (as of the last refresh).
    pub registered: bool,
    pub lease: Option<i64>,
    /// How many times the key was put (1 + re-registrations after lost leases).
    pub registrations: u64,
    /// Why the last attempt failed, while etcd is unreachable.
    pub last_error: Option<String>,
}

/// A key kept alive in etcd; dropping it stops the refresh (the key then expires within
/// the TTL); [`Registration::deregister`] removes it at once.
pub struct Registration {
    status: watch::Receiver<RegistrationStatus>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Registration {
    pub fn start(
        client: EtcdClient,
        key: impl Into<String>,
        value: Vec<u8>,
        config: RegistrationConfig,
    ) -> Self {
        let (tx, status) = watch::channel(RegistrationStatus::default());
        let stop = CancellationToken::new();
        let keeper = Keeper {
            client,
            key: key.into(),
            value,
            config,
            status: tx,
            stop: stop.clone(),
        };
        Registration {
            status,
            stop,
            task: Some(tokio::spawn(keeper.run())),
        }
    }

    pub fn status(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.clone()
    }

    /// Waits until the key is registered, at most `timeout`; returns whether it is.
    pub async fn wait_registered(&self, timeout: Duration) -> bool {
        let mut status = self.status.clone();
        tokio::time::timeout(timeout, status.wait_for(|s| s.registered))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops refreshing and revokes the lease, so the key goes at once.
    pub async fn deregister(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Keeper {
    client: EtcdClient,
    key: String,
    value: Vec<u8>,
    config: RegistrationConfig,
    status: watch::Sender<RegistrationStatus>,
    stop: CancellationToken,
}

impl Keeper {
    async fn run(self) {
        let mut backoff = Backoff::new(self.config.retry_base, self.config.retry_max);
        let refresh = (self.config.ttl / 3).max(Duration::from_millis(100));
        loop {
            let lease = match self.put_under_new_lease().await {
                Ok(lease) => lease,
                Err(e) => {
                    self.failed(&e);
                    if self.sleep(backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            self.status.send_modify(|s| {
                s.registered = true;
                s.lease = Some(lease);
                s.registrations += 1;
                s.last_error = None;
            });
            tracing::info!(key = %self.key, lease, "registered in etcd");
            let mut wait = refresh;
            loop {
                if self.sleep(wait).await {
                    // Best effort: an unreachable etcd lets the lease expire instead.
                    let revoke = self.client.lease_revoke(lease);
                    let _ = tokio::time::timeout(Duration::from_secs(1), revoke).await;
                    return;
                }
                match self.client.lease_keep_alive(lease).await {
                    Ok(_) => {
                        wait = refresh;
                        backoff.reset();
                        self.status.send_if_modified(|s| {
                            let changed = !s.registered || s.last_error.is_some();
                            s.registered = true;
                            s.last_error = None;
                            changed
                        });
                    }
                    Err(DiscoveryError::LeaseNotFound) => {
                        tracing::warn!(key = %self.key, lease, "etcd lease expired; registering again");
                        self.failed(&DiscoveryError::LeaseNotFound);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(key = %self.key, error = %e, "cannot refresh etcd lease; retrying");
                        self.failed(&e);
                        wait = backoff.next_delay();
                    }
                }
            }
        }
    }

    async fn put_under_new_lease(&self) -> Result<i64, DiscoveryError> {
        let lease = self.client.lease_grant(self.config.ttl).await?;
        self.client.put(&self.key, &self.value, lease).await?;
        Ok(lease)
    }

    fn failed(&self, e: &DiscoveryError) {
        self.status.send_modify(|s| {
            s.registered = false;
            s.last_error = Some(e.to_string());
        });
    }

    /// Sleeps; returns true if stopped meanwhile.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }
}
