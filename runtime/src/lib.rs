//! The dynamo runtime: the edge contract every node speaks, the transports that carry it,
//! discovery, process supervision and telemetry. It knows nothing of LLMs.

pub mod discovery;
pub mod drain;
pub mod edge;
pub mod edge_metrics;
pub mod error;
pub mod instances;
pub mod kv_transfer;
pub mod supervisor;
pub mod telemetry;
pub mod transport;

pub use edge::{error_stream, Message, RequestContext, ResponseStream, Service};
pub use error::{ErrorKind, ServeError};
pub use instances::{Instance, InstanceId, InstanceSet};
