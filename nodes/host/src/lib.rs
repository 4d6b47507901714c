//! Runs a [`Plan`](dynamo_graph::Plan).
//!
//! - [`process`]: inside one planned process (`dynamo node run`), build its replicas, bind
//!   its local socket, and connect every output port with the transport the plan chose
//!   (in-process, local socket or NATS: [`nats`]). The node never chooses.
//! - [`controller`]: `dynamo graph up`, which starts every process of this machine under
//!   the runtime's supervisor, waits until each is ready and stops them all on a signal.
//! - [`admin`]: the live graph page and `/api/stats` that `graph up` serves.

pub mod admin;
pub mod agent;
pub mod cluster;
pub mod controller;
pub mod endpoints;
pub mod events;
pub mod external;
pub mod gpus;
pub mod kv_tcp;
pub mod metrics;
pub mod model;
pub mod nats;
pub mod nodes;
pub mod process;

/// The line a process prints on stdout once all its replicas serve.
pub const READY_LINE: &str = "DYNAMO_READY";
/// The line a process hosting a frontend prints with its HTTP address, before `READY_LINE`.
pub const HTTP_LINE: &str = "DYNAMO_HTTP";
