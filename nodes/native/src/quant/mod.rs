//! Quantized weight matrices and the matmul kernels over them.
