//! NATS subjects for edges. An endpoint (one input port of one node of one graph in one
//! namespace) has a load-balanced subject that every instance serves in one queue group,
//! and a per-instance subject under it so a router can target one worker:
//!
//! ```text
//! dynamo.<namespace>.<graph>.<node>.<port>            any instance (queue group)
//! dynamo.<namespace>.<graph>.<node>.<port>.<id hex>   exactly instance <id>
//! dynamo-ctl.<namespace>.<graph>.<node>.<id hex>      cancel / credit for instance <id>
//! ```
//!
//! Names become subject tokens: characters NATS gives meaning to (`.`, `*`, `>`,
//! whitespace) and anything outside `[A-Za-z0-9_-]` become `_`, so two graphs in different
//! namespaces never share a subject and no name can inject a wildcard.

use std::fmt;

use crate::instances::InstanceId;

/// Where one input port lives on NATS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointAddress {
    pub namespace: String,
    pub graph: String,
    pub node: String,
    pub port: String,
}

impl EndpointAddress {
    pub fn new(
        namespace: impl Into<String>,
        graph: impl Into<String>,
        node: impl Into<String>,
        port: impl Into<String>,
    ) -> Self {
        EndpointAddress {
            namespace: namespace.into(),
            graph: graph.into(),
            node: node.into(),
            port: port.into(),
        }
    }

    /// The subject every instance serves in one queue group.
    pub fn subject(&self) -> String {
        format!(
            "dynamo.{}.{}.{}.{}",
            token(&self.namespace),
            token(&self.graph),
            token(&self.node),
            token(&self.port)
        )
    }

    /// The subject only instance `id` serves.
    pub fn instance_subject(&self, id: InstanceId) -> String {
        format!("{}.{id:x}", self.subject())
    }

    /// Where clients send cancellation and credit for streams instance `id` serves.
    pub fn control_subject(&self, id: InstanceId) -> String {
        control_subject(&self.namespace, &self.graph, &self.node, id)
    }
}

pub(super) fn control_subject(namespace: &str, graph: &str, node: &str, id: InstanceId) -> String {
    format!(
        "dynamo-ctl.{}.{}.{}.{id:x}",
        token(namespace),
        token(graph),
        token(node)
    )
}

impl fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}.{}",
            self.namespace, self.graph, self.node, self.port
        )
    }
}

/// One subject token for `name`: never empty, never a wildcard, never a separator.
pub fn token(name: &str) -> String {
    if name.is_empty() {
        return "_".to_string();
    }
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_derived_from_the_address() {
        let a = EndpointAddress::new("prod", "disagg", "decode", "generate");
        assert_eq!(a.subject(), "dynamo.prod.disagg.decode.generate");
        assert_eq!(
            a.instance_subject(0xbeef),
            "dynamo.prod.disagg.decode.generate.beef"
        );
        assert_eq!(a.control_subject(255), "dynamo-ctl.prod.disagg.decode.ff");
        assert_eq!(a.to_string(), "prod/disagg/decode.generate");
    }

    #[test]
    fn names_cannot_inject_wildcards_or_separators() {
        assert_eq!(token("a.b"), "a_b");
        assert_eq!(token("*"), "_");
        assert_eq!(token(">"), "_");
        assert_eq!(token("two words"), "two_words");
        assert_eq!(token(""), "_");
        assert_eq!(token("décode"), "d_code");
        let a = EndpointAddress::new("ns", "g", "n.>", "p");
        assert_eq!(a.subject(), "dynamo.ns.g.n__.p");
    }
}
