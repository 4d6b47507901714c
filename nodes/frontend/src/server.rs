//! Serving a [`Frontend`] on a listener the caller bound (nodes never open sockets).

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::error::FrontendError;
use crate::frontend::Frontend;

/// How long to wait for connections to close once in-flight requests were ended.
const FORCED_STOP_WAIT: Duration = Duration::from_secs(5);

/// Called with every accepted connection after TCP_NODELAY is set (tests, connection
/// accounting).
pub type AcceptHook = Arc<dyn Fn(&TcpStream) + Send + Sync>;

/// Serves `frontend` on `listener` until `shutdown` is cancelled, then stops accepting,
/// lets in-flight requests finish for at most `config.shutdown_grace`, then ends the
/// rest (a 503, or an SSE error event if streaming; each is cancelled downstream) and
/// returns.
pub async fn serve(
    listener: TcpListener,
    frontend: Frontend,
    shutdown: CancellationToken,
) -> Result<(), FrontendError> {
    serve_with_hook(listener, frontend, shutdown, None).await
}

/// [`serve`], calling `on_accept` with every accepted connection.
pub async fn serve_with_hook(
    listener: TcpListener,
    frontend: Frontend,
    shutdown: CancellationToken,
    on_accept: Option<AcceptHook>,
) -> Result<(), FrontendError> {
    let grace = frontend.config.shutdown_grace;
    let address = listener.local_addr()?;
    tracing::info!(%address, models = ?frontend.config.served_models, "frontend listening");
    // Without TCP_NODELAY a small response (one SSE chunk, one JSON answer) can wait
    // ~40 ms for the client's delayed ACK (Nagle); latency matters more than packets here.
    let listener = listener.tap_io(move |tcp: &mut TcpStream| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on an accepted connection");
        }
        if let Some(hook) = &on_accept {
            hook(tcp);
        }
    });
    let stopping = frontend.stopping.clone();
    let server = axum::serve(listener, frontend.router())
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    tokio::pin!(server);
    let grace_over = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = &mut server => result?,
        () = grace_over => {
            tracing::warn!(
                grace_s = grace.as_secs_f64(),
                "in-flight requests did not finish within the shutdown grace; ending them"
            );
            // Every in-flight call ends with a 503 / an SSE error event and is cancelled
            // downstream; the connections then close and the server future completes.
            stopping.cancel();
            if tokio::time::timeout(FORCED_STOP_WAIT, &mut server).await.is_err() {
                tracing::warn!("some connections are still open (slow readers); leaving them");
            }
        }
    }
    tracing::info!(%address, "frontend stopped");
    Ok(())
}
