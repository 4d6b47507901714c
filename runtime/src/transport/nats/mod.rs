//! The NATS transport: the same edge contract as the local socket (typed request, typed
//! response stream, cancellation forward, trace context along), between machines.
//!
//! - Requests go to a subject derived from namespace/graph/node/port (any instance, one
//!   queue group) or to a per-instance subject under it (a router's pick): see
//!   [`EndpointAddress`].
//! - Responses come back on the call's reply subject, numbered, ending with an explicit
//!   end or error frame; quiet streams get heartbeats. A lost message or a dead worker ends
//!   the call with `Unavailable` within the client's `idle_timeout`, never a hang.
//! - Cancellation and flow-control credit are messages to the serving instance's control
//!   subject. The W3C `traceparent` and the request id travel as NATS headers.
//! - Calls in flight are bounded per endpoint on both sides.
//!
//! The wire format is in [`wire`].

mod batch;
mod client;
mod client_stream;
mod server;
mod server_stream;
pub mod subject;
pub mod wire;

use std::time::Duration;

pub use client::{NatsClient, NatsClientConfig};
pub use server::{NatsServer, NatsServerConfig};
pub use subject::EndpointAddress;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("cannot subscribe to {0}: {1}")]
    Subscribe(String, String),
    #[error("NATS did not confirm the subscriptions: {0}")]
    Flush(String),
    #[error("port `{0}` is registered twice")]
    DuplicateEndpoint(String),
}

/// [`connect`], giving up after `within` (a server that accepts the TCP connection and
/// then says nothing is otherwise waited for indefinitely).
pub async fn connect_within(url: &str, within: Duration) -> Result<async_nats::Client, NatsError> {
    match tokio::time::timeout(within, connect(url)).await {
        Ok(r) => r,
        Err(_) => Err(NatsError::Connect {
            url: url.to_string(),
            message: format!("no answer within {within:?}"),
        }),
    }
}

/// Connects to NATS with the settings every dynamo process uses: it reconnects forever
/// after a connection loss (with the client's own backoff), notices a dead server within
/// a few seconds (ping interval), and fails fast with a clear error when the server cannot
/// be reached at startup.
pub async fn connect(url: &str) -> Result<async_nats::Client, NatsError> {
    async_nats::ConnectOptions::new()
        .name("dynamo")
        .connection_timeout(Duration::from_secs(3))
        .ping_interval(Duration::from_secs(2))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            // 0, 50, 100, 200 … ms, capped at 2 s, with jitter so a fleet does not
            // reconnect in lockstep.
            let base = 25u64.saturating_mul(1 << attempts.min(7)).min(2000);
            Duration::from_millis(if attempts == 0 {
                0
            } else {
                base + fastrand::u64(0..=base / 2)
            })
        })
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS disconnected; reconnecting")
                }
                other => tracing::debug!(event = %other, "NATS event"),
            }
        })
        .connect(url)
        .await
        .map_err(|e| NatsError::Connect {
            url: url.to_string(),
            message: e.to_string(),
        })
}
