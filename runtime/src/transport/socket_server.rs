//! The serving side of the socket transport: one Unix socket (same machine) or one TCP
//! listener (across machines: the KV data plane), any number of named endpoints, any
//! number of concurrent request streams per connection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::frame::{self, Header, StreamId, MAX_WINDOW};
use super::server_stream::{Endpoint, Outbox, Typed};
use super::writer::write_frames;
use crate::drain::{Drain, InFlight};
use crate::edge::{Message, RequestContext, Service};
use crate::error::{ErrorKind, ServeError};

/// Frames queued for one connection's writer before response streams wait (backpressure).
const WRITE_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    BindTcp {
        addr: String,
        source: std::io::Error,
    },
    #[error("socket {path} is already served by a live process")]
    InUse { path: PathBuf },
    #[error("endpoint `{0}` is registered twice")]
    DuplicateEndpoint(String),
}

/// Serves registered endpoints on a Unix socket until a shutdown token fires.
///
/// ```no_run
/// # async fn run(svc: std::sync::Arc<dyn dynamo_runtime::Service<String, String>>) -> Result<(), Box<dyn std::error::Error>> {
/// use dynamo_runtime::transport::SocketServer;
/// let mut server = SocketServer::bind("/tmp/decode-1.sock")?;
/// server.register::<String, String>("generate", svc)?;
/// let shutdown = tokio_util::sync::CancellationToken::new();
/// server.serve(shutdown).await;
/// # Ok(()) }
/// ```
pub struct SocketServer {
    listener: Listener,
    /// The socket file (empty for TCP).
    path: PathBuf,
    endpoints: HashMap<String, Arc<dyn Endpoint>>,
    drain: Drain,
    drain_timeout: Duration,
}

impl SocketServer {
    /// Binds `path`, replacing a stale socket file left by a dead process (but never one
    /// a live process still accepts on). Must be called inside a tokio runtime.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ServerError> {
        let path = path.as_ref().to_path_buf();
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(ServerError::InUse { path });
            }
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path).map_err(|source| ServerError::Bind {
            path: path.clone(),
            source,
        })?;
        Ok(Self::on(Listener::Unix(listener), path))
    }

    /// Listens on TCP `addr` (`HOST:PORT`; port 0 picks a free one: see
    /// [`SocketServer::local_addr`]). Must be called inside a tokio runtime.
    pub fn bind_tcp(addr: &str) -> Result<Self, ServerError> {
        let bind_err = |source| ServerError::BindTcp {
            addr: addr.to_string(),
            source,
        };
        let std = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        std.set_nonblocking(true).map_err(bind_err)?;
        let listener = TcpListener::from_std(std).map_err(bind_err)?;
        Ok(Self::on(Listener::Tcp(listener), PathBuf::new()))
    }

    fn on(listener: Listener, path: PathBuf) -> Self {
        SocketServer {
            listener,
            path,
            endpoints: HashMap::new(),
            drain: Drain::new(),
            drain_timeout: Duration::from_secs(10),
        }
    }

    /// The socket file; empty for a TCP server.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The TCP address this server listens on (`None` for a Unix socket).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(_) => None,
        }
    }

    /// How long `serve` waits for in-flight requests after shutdown before cancelling them.
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Requests in flight on this server right now.
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }

    pub fn register<Req: Message, Resp: Message>(
        &mut self,
        endpoint: &str,
        service: Arc<dyn Service<Req, Resp>>,
    ) -> Result<(), ServerError> {
        if self.endpoints.contains_key(endpoint) {
            return Err(ServerError::DuplicateEndpoint(endpoint.to_string()));
        }
        self.endpoints
            .insert(endpoint.to_string(), Arc::new(Typed { service }));
        Ok(())
    }

    /// Accepts connections until `shutdown` fires, then refuses new requests, waits up to
    /// the drain timeout for in-flight ones, cancels what is left and removes the socket.
    pub async fn serve(self, shutdown: CancellationToken) {
        let shared = Arc::new(Shared {
            endpoints: self.endpoints,
            drain: self.drain.clone(),
            hard_stop: CancellationToken::new(),
        });
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept(shared.clone()) => a,
            };
            if let Err(e) = accepted {
                tracing::warn!(path = %self.path.display(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if matches!(self.listener, Listener::Unix(_)) {
            let _ = std::fs::remove_file(&self.path);
        }
        drop(self.listener);
        self.drain.start_draining();
        if !self.drain.wait_idle(self.drain_timeout).await {
            tracing::warn!(
                in_flight = self.drain.in_flight(),
                "drain timeout elapsed; cancelling remaining requests"
            );
        }
        shared.hard_stop.cancel();
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Accepts one connection and serves it on a task of its own.
    async fn accept(&self, shared: Arc<Shared>) -> std::io::Result<()> {
        match self {
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                let (rd, wr) = stream.into_split();
                tokio::spawn(serve_connection(rd, wr, shared));
            }
            Listener::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                // Frames are whole messages, written in batches: Nagle only delays them.
                let _ = stream.set_nodelay(true);
                let (rd, wr) = stream.into_split();
                tokio::spawn(serve_connection(rd, wr, shared));
            }
        }
        Ok(())
    }
}

struct Shared {
    endpoints: HashMap<String, Arc<dyn Endpoint>>,
    drain: Drain,
    hard_stop: CancellationToken,
}

/// One connection: cancelling `token` cancels every request on it.
struct Conn {
    out: mpsc::Sender<Bytes>,
    token: CancellationToken,
    streams: Mutex<HashMap<StreamId, StreamEntry>>,
}

/// A request stream in flight: how to cancel it and how much it may still send.
struct StreamEntry {
    cancel: CancellationToken,
    credits: Arc<Semaphore>,
    window: u32,
}

async fn serve_connection<R, W>(rd: R, wr: W, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out, queue) = mpsc::channel(WRITE_QUEUE);
    let conn = Arc::new(Conn {
        out,
        token: shared.hard_stop.child_token(),
        streams: Mutex::new(HashMap::new()),
    });
    tokio::spawn(write_frames(wr, queue, conn.token.clone()));
    let mut frames = FramedRead::new(rd, frame::codec());
    loop {
        let next = tokio::select! {
            _ = conn.token.cancelled() => break,
            f = frames.next() => f,
        };
        let result = match next {
            None => break,
            Some(Err(e)) => Err(format!("cannot read frame: {e}")),
            Some(Ok(bytes)) => handle_frame(&bytes, &conn, &shared).await,
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "closing socket connection");
            break;
        }
    }
    conn.token.cancel();
}

/// Handles one frame; `Err` means the connection is broken and must be closed.
async fn handle_frame(bytes: &[u8], conn: &Arc<Conn>, shared: &Shared) -> Result<(), String> {
    let (header, payload) = frame::decode(bytes).map_err(|e| e.to_string())?;
    match header {
        Header::Request {
            stream_id,
            window,
            endpoint,
            request_id,
            traceparent,
        } => {
            let Some(handler) = shared.endpoints.get(endpoint) else {
                let mut known: Vec<&str> = shared.endpoints.keys().map(String::as_str).collect();
                known.sort_unstable();
                let msg = format!(
                    "unknown endpoint `{endpoint}`; this server has: {}",
                    known.join(", ")
                );
                return send_error(conn, stream_id, ServeError::new(ErrorKind::NotFound, msg))
                    .await;
            };
            let Some(in_flight) = shared.drain.try_enter() else {
                let e = ServeError::unavailable("server is shutting down");
                return send_error(conn, stream_id, e).await;
            };
            let token = conn.token.child_token();
            let ctx = RequestContext::with_token(
                request_id,
                traceparent.map(str::to_string),
                token.clone(),
            );
            let span =
                tracing::info_span!("serve", endpoint, request_id = %ctx.request_id, stream_id);
            let window = window.clamp(1, MAX_WINDOW);
            let credits = Arc::new(Semaphore::new(window as usize));
            let out = Outbox {
                frames: conn.out.clone(),
                credits: credits.clone(),
            };
            match handler.open(stream_id, payload, ctx, out) {
                Ok(pump) => {
                    let entry = StreamEntry {
                        cancel: token,
                        credits,
                        window,
                    };
                    let replaced = lock(&conn.streams).insert(stream_id, entry);
                    if let Some(old) = replaced {
                        old.cancel.cancel();
                    }
                    tokio::spawn(finish(pump, conn.clone(), stream_id, in_flight).instrument(span));
                    Ok(())
                }
                Err(e) => {
                    let msg = format!("cannot decode request for `{endpoint}`: {e}");
                    send_error(conn, stream_id, ServeError::invalid(msg)).await
                }
            }
        }
        Header::Cancel { stream_id } => {
            if let Some(entry) = lock(&conn.streams).remove(&stream_id) {
                entry.cancel.cancel();
            }
            Ok(())
        }
        Header::Credit { stream_id, n } => {
            if let Some(entry) = lock(&conn.streams).get(&stream_id) {
                // Never beyond the window: a confused client cannot unbound the stream.
                let available =
                    u32::try_from(entry.credits.available_permits()).unwrap_or(u32::MAX);
                let n = n.min(entry.window.saturating_sub(available));
                entry.credits.add_permits(n as usize);
            }
            Ok(())
        }
        other => Err(format!("unexpected {other:?} frame from a client")),
    }
}

async fn finish(pump: BoxFuture<'static, ()>, conn: Arc<Conn>, id: StreamId, in_flight: InFlight) {
    pump.await;
    lock(&conn.streams).remove(&id);
    drop(in_flight);
}

async fn send_error(conn: &Conn, stream_id: StreamId, error: ServeError) -> Result<(), String> {
    let mut buf = BytesMut::new();
    let frame = frame::encode(&mut buf, &Header::Error { stream_id, error }, None::<&()>)
        .map_err(|e| e.to_string())?;
    // A closed writer means the connection is going away; the read loop will notice.
    let _ = conn.out.send(frame).await;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
