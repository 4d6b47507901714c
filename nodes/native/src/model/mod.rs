//! The llama-family transformer: configuration, weights, rotary embedding and the batched
//! forward pass.

pub mod attention;
pub mod config;
pub mod forward;
pub mod rope;
pub mod vmath;
pub mod weights;

pub use config::{ModelConfig, RopeStyle};
pub use forward::{BatchSeq, ForwardError, Model};
pub use weights::{load, Weights};
