//! The dynamo runtime: the edge contract every node speaks, the transports that carry it,
//! discovery, process supervision and telemetry. It knows nothing of LLMs.

pub mod edge;
pub mod error;

pub use edge::{Message, RequestContext, ResponseStream, Service};
pub use error::{ErrorKind, ServeError};
