//! Transports that carry an edge. Every client a transport hands out is itself an
//! `Arc<dyn Service<Req, Resp>>`, so a node calls its output port the same way whichever
//! transport the plan picked.

pub mod bulk;
mod client_stream;
mod dial;
pub mod frame;
pub mod in_process;
pub mod nats;
mod server_stream;
pub mod socket_client;
pub mod socket_server;
mod writer;

pub use in_process::{CancelOnDrop, InProcessClient};
pub use socket_client::{SocketClient, SocketClientConfig};
pub use socket_server::{ServerError, SocketServer};
