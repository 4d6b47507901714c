//! End-to-end tests of the frontend over real HTTP on loopback, against a fake downstream.
//! One test binary, so the harness is compiled once.

mod cases;
mod common;
mod conformance;
mod lifecycle;
mod streaming;
