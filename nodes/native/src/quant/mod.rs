//! Quantized weight matrices and the matmul kernels over them.
//!
//! * [`format`]: GGML block formats and the 8-row panel layout they are repacked into.
//! * [`activation`]: f32 activations to 8-bit blocks (llama.cpp's Q8_0 / Q8_1).
//! * [`kernels`]: the panel kernels per ISA (AVX-512 VNNI, AVX2, scalar), chosen at run time.
//! * [`matrix`]: [`QMatrix`] and the tiled, threaded matmul driver.
//! * [`pool`]: [`ComputePool`], persistent threads that block when idle.
//! * [`simd`]: f32 dot / axpy / scale for attention.

mod activation;
mod error;
mod format;
mod kernels;
mod matrix;
mod pool;
pub mod simd;

pub use activation::Workspace;
pub use error::QuantError;
pub use matrix::QMatrix;
pub use pool::ComputePool;

/// The kernel path runtime detection chose: `"avx512vnni"`, `"avx2"` or `"scalar"`.
pub fn kernel_name() -> &'static str {
    kernels::Isa::detect().name()
}
