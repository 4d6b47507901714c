//! Discovery: which instances of which node are alive, across machines.
//!
//! Every process registers its instances in etcd under a lease ([`Registration`]), and
//! callers follow the instances of the nodes they call ([`PrefixWatch`]). An instance's
//! key is `dynamo/instances/<namespace>/<graph>/<node>/<port>/<instance id hex>`; the id is
//! chosen by the process and stays the same across re-registrations, so an etcd outage
//! changes no subject and no routing decision.

mod backoff;
pub mod etcd;
mod registration;
mod watch;

pub use backoff::Backoff;
pub use etcd::{EtcdClient, KeyValue, WatchEvent};
pub use registration::{Registration, RegistrationConfig, RegistrationStatus};
pub use watch::{PrefixWatch, Snapshot};

use crate::instances::InstanceId;
use crate::transport::nats::subject::token;
use crate::transport::nats::EndpointAddress;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoveryError {
    #[error("etcd URL `{0}` is not supported: use http://HOST:PORT")]
    BadUrl(String),
    #[error("etcd is unreachable: {0}")]
    Unreachable(String),
    #[error("the etcd lease expired or is unknown")]
    LeaseNotFound,
    #[error("etcd: {0}")]
    Etcd(String),
}

/// The prefix under which the instances of one endpoint register.
pub fn instances_prefix(address: &EndpointAddress) -> String {
    format!(
        "dynamo/instances/{}/{}/{}/{}/",
        token(&address.namespace),
        token(&address.graph),
        token(&address.node),
        token(&address.port)
    )
}

/// The key of one instance of an endpoint.
pub fn instance_key(address: &EndpointAddress, id: InstanceId) -> String {
    format!("{}{id:x}", instances_prefix(address))
}

/// The instance ids in a snapshot of an endpoint's prefix, sorted.
pub fn instance_ids(snapshot: &Snapshot) -> Vec<InstanceId> {
    let mut ids: Vec<InstanceId> = snapshot
        .keys()
        .filter_map(|k| k.rsplit('/').next())
        .filter_map(|id| InstanceId::from_str_radix(id, 16).ok())
        .collect();
    ids.sort_unstable();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    #[test]
    fn keys_name_the_endpoint_and_instance() {
        let a = EndpointAddress::new("prod", "disagg", "decode", "generate");
        assert_eq!(
            instance_key(&a, 0xbeef),
            "dynamo/instances/prod/disagg/decode/generate/beef"
        );
        let snap: Snapshot = Arc::new(BTreeMap::from([
            (instance_key(&a, 0x20), vec![]),
            (instance_key(&a, 0x3), vec![]),
            (format!("{}junk-", instances_prefix(&a)), vec![]),
        ]));
        assert_eq!(instance_ids(&snap), vec![0x3, 0x20]);
    }
}
