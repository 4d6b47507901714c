//! The calling side of the socket transport (a Unix socket on one machine, TCP across
//! machines). One client holds one connection to a server and multiplexes every call
//! over it; each endpoint handle is an
//! `Arc<dyn Service<Req, Resp>>`, so the node that holds it never sees the transport.
//!
//! If the connection dies, every stream in flight ends with `Unavailable` and the next
//! call reconnects (bounded by the connect timeout).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::client_stream::{ClientStream, Incoming, Open, StreamGuard};
use super::dial::DialGate;
use super::frame::{self, Header, StreamId, MAX_WINDOW};
use super::writer::write_frames;
use crate::edge::{error_stream, Message, RequestContext, ResponseStream, Service};
use crate::error::ServeError;

#[derive(Debug, Clone)]
pub struct SocketClientConfig {
    /// Longest a (re)connect may take before the call fails with `Unavailable`.
    pub connect_timeout: Duration,
    /// Responses the server may send on one stream ahead of its consumer (flow-control
    /// window, at most 4096). A slow consumer holds back only its own stream.
    pub stream_window: usize,
    /// Frames queued for the writer before callers wait.
    pub write_queue: usize,
}

impl Default for SocketClientConfig {
    fn default() -> Self {
        SocketClientConfig {
            connect_timeout: Duration::from_secs(2),
            stream_window: 64,
            write_queue: 256,
        }
    }
}

/// A connection (made on demand, remade after failure) to one [`super::SocketServer`].
///
/// ```no_run
/// # async fn run() -> Result<(), dynamo_runtime::ServeError> {
/// use dynamo_runtime::{transport::SocketClient, RequestContext};
/// use futures::StreamExt;
/// let client = SocketClient::connect("/tmp/decode-1.sock").await?;
/// let generate = client.endpoint::<String, String>("generate");
/// let mut stream = generate.call("hi".into(), RequestContext::new("req-1"));
/// while let Some(item) = stream.next().await { let _ = item?; }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SocketClient {
    inner: Arc<ClientInner>,
}

/// Finds a TCP server's `HOST:PORT` anew at every (re)connect: a peer that restarted
/// elsewhere, or on another port, is found again.
pub type Resolve = Arc<dyn Fn() -> BoxFuture<'static, Result<String, ServeError>> + Send + Sync>;

enum Target {
    Unix(PathBuf),
    Tcp(Resolve),
}

/// A connection just made, before it is split.
enum Dialed {
    Unix(UnixStream),
    Tcp(TcpStream),
}

struct ClientInner {
    target: Target,
    /// The path (or the TCP peer's name) as text, for error messages.
    display: Arc<str>,
    config: SocketClientConfig,
    current: ArcSwapOption<Connection>,
    reconnect: DialGate,
    next_stream: AtomicU64,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        if let Some(conn) = self.current.load_full() {
            conn.closed.cancel();
        }
    }
}

impl SocketClient {
    /// Connects now, so a wrong path shows up at startup rather than at the first call.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ServeError> {
        Self::connect_with(path, SocketClientConfig::default()).await
    }

    pub async fn connect_with(
        path: impl AsRef<Path>,
        config: SocketClientConfig,
    ) -> Result<Self, ServeError> {
        let client = Self::lazy(path, config);
        client.inner.connection().await?;
        Ok(client)
    }

    /// A client that connects on its first call.
    pub fn lazy(path: impl AsRef<Path>, config: SocketClientConfig) -> Self {
        Self::with_target(
            Target::Unix(path.as_ref().to_path_buf()),
            path.as_ref().display().to_string(),
            config,
        )
    }

    /// A client of the TCP server at `addr` (`HOST:PORT`), connecting on its first call.
    pub fn tcp(addr: &str, config: SocketClientConfig) -> Self {
        let fixed = addr.to_string();
        let resolve: Resolve = Arc::new(move || futures::future::ready(Ok(fixed.clone())).boxed());
        Self::with_target(Target::Tcp(resolve), addr.to_string(), config)
    }

    /// A client of a TCP server whose address `resolve` looks up at every (re)connect;
    /// `name` says which peer it is in error messages.
    pub fn tcp_resolved(name: &str, resolve: Resolve, config: SocketClientConfig) -> Self {
        Self::with_target(Target::Tcp(resolve), name.to_string(), config)
    }

    fn with_target(target: Target, display: String, config: SocketClientConfig) -> Self {
        SocketClient {
            inner: Arc::new(ClientInner {
                target,
                display: display.into(),
                config,
                current: ArcSwapOption::empty(),
                reconnect: DialGate::default(),
                next_stream: AtomicU64::new(1),
            }),
        }
    }

    /// The socket file; empty for a TCP client.
    pub fn path(&self) -> &Path {
        match &self.inner.target {
            Target::Unix(path) => path,
            Target::Tcp(_) => Path::new(""),
        }
    }

    /// A handle on one endpoint of the server, usable as any other output port.
    pub fn endpoint<Req: Message, Resp: Message>(&self, name: &str) -> Arc<dyn Service<Req, Resp>> {
        Arc::new(Endpoint::<Req, Resp> {
            client: self.inner.clone(),
            name: name.into(),
            _types: PhantomData,
        })
    }
}

impl ClientInner {
    /// The live connection, or a new one. Callers queue behind one connect attempt at a
    /// time; if the attempt they waited for failed, they get its error rather than trying
    /// again one after another, so no call waits much longer than one connect timeout.
    async fn connection(&self) -> Result<Arc<Connection>, ServeError> {
        self.reconnect
            .connect(
                || self.live(),
                || async {
                    let conn = match self.dial().await? {
                        Dialed::Unix(stream) => {
                            let (rd, wr) = stream.into_split();
                            Connection::start(rd, wr, &self.config)
                        }
                        Dialed::Tcp(stream) => {
                            let (rd, wr) = stream.into_split();
                            Connection::start(rd, wr, &self.config)
                        }
                    };
                    self.current.store(Some(conn.clone()));
                    Ok(conn)
                },
            )
            .await
    }

    async fn dial(&self) -> Result<Dialed, ServeError> {
        let timeout = self.config.connect_timeout;
        let connect = async {
            match &self.target {
                Target::Unix(path) => UnixStream::connect(path)
                    .await
                    .map(Dialed::Unix)
                    .map_err(|e| format!("cannot connect to {}: {e}", self.display)),
                Target::Tcp(resolve) => {
                    let addr = resolve().await.map_err(|e| e.message)?;
                    let stream = TcpStream::connect(&addr).await.map_err(|e| {
                        format!("cannot connect to {} at {addr}: {e}", self.display)
                    })?;
                    let _ = stream.set_nodelay(true);
                    Ok(Dialed::Tcp(stream))
                }
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(message)) => Err(ServeError::unavailable(message)),
            Err(_) => Err(ServeError::unavailable(format!(
                "connecting to {} timed out after {timeout:?}",
                self.display
            ))),
        }
    }

    fn window(&self) -> u32 {
        u32::try_from(self.config.stream_window)
            .unwrap_or(MAX_WINDOW)
            .clamp(1, MAX_WINDOW)
    }

    fn live(&self) -> Option<Arc<Connection>> {
        self.current
            .load_full()
            .filter(|c| !c.closed.is_cancelled())
    }
}

/// One live connection: the writer's queue and the streams waiting for frames.
pub(super) struct Connection {
    pub(super) out: mpsc::Sender<Bytes>,
    streams: Mutex<HashMap<StreamId, mpsc::Sender<Incoming>>>,
    pub(super) closed: CancellationToken,
}

impl Connection {
    fn start<R, W>(rd: R, wr: W, config: &SocketClientConfig) -> Arc<Self>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out, queue) = mpsc::channel(config.write_queue.max(1));
        let conn = Arc::new(Connection {
            out,
            streams: Mutex::new(HashMap::new()),
            closed: CancellationToken::new(),
        });
        tokio::spawn(write_frames(wr, queue, conn.closed.clone()));
        tokio::spawn(read_frames(rd, conn.clone()));
        conn
    }

    pub(super) fn streams(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<StreamId, mpsc::Sender<Incoming>>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands a frame to its stream without waiting: the stream's channel holds its whole
    /// window plus the final frame, so only a server ignoring flow control can fill it.
    fn deliver(&self, id: StreamId, item: Incoming, last: bool) -> Result<(), String> {
        let mut streams = self.streams();
        let sent = if last {
            streams.remove(&id).map(|tx| tx.try_send(item))
        } else {
            streams.get(&id).map(|tx| tx.try_send(item))
        };
        match sent {
            Some(Err(mpsc::error::TrySendError::Full(_))) => Err(format!(
                "server overran the flow-control window of stream {id}"
            )),
            // Closed or absent: the caller dropped the stream and a Cancel is on its way.
            _ => Ok(()),
        }
    }
}

/// Routes incoming frames to their streams until the connection ends, then drops every
/// stream's sender so each one ends with `Unavailable`.
async fn read_frames<R: AsyncRead + Unpin>(rd: R, conn: Arc<Connection>) {
    let mut frames = FramedRead::new(rd, frame::codec());
    loop {
        let next = tokio::select! {
            _ = conn.closed.cancelled() => break,
            f = frames.next() => f,
        };
        let bytes = match next {
            None => break,
            Some(Ok(b)) => b.freeze(),
            Some(Err(e)) => {
                tracing::error!(error = %e, "cannot read frame; closing socket connection");
                break;
            }
        };
        let (header, payload) = match frame::decode(&bytes) {
            Ok(decoded) => decoded,
            Err(e) => {
                tracing::error!(error = %e, "closing socket connection");
                break;
            }
        };
        let delivered = match header {
            Header::Response { stream_id } => {
                let item = bytes.slice(bytes.len() - payload.len()..);
                conn.deliver(stream_id, Incoming::Item(item), false)
            }
            Header::End { stream_id } => conn.deliver(stream_id, Incoming::End, true),
            Header::Error { stream_id, error } => {
                conn.deliver(stream_id, Incoming::Error(error), true)
            }
            other => Err(format!("unexpected frame from a server: {other:?}")),
        };
        if let Err(e) = delivered {
            tracing::error!(error = %e, "closing socket connection");
            break;
        }
    }
    conn.closed.cancel();
    conn.streams().clear();
}

struct Endpoint<Req, Resp> {
    client: Arc<ClientInner>,
    name: Box<str>,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req: Message, Resp: Message> Service<Req, Resp> for Endpoint<Req, Resp> {
    fn call(&self, req: Req, ctx: RequestContext) -> ResponseStream<Resp> {
        let stream_id = self.client.next_stream.fetch_add(1, Ordering::Relaxed);
        let window = self.client.window();
        let header = Header::Request {
            stream_id,
            window,
            endpoint: &self.name,
            request_id: &ctx.request_id,
            traceparent: ctx.traceparent.as_deref(),
        };
        let request = match frame::encode(&mut BytesMut::new(), &header, Some(&req)) {
            Ok(f) => f,
            Err(e) => {
                return error_stream(ServeError::invalid(format!("cannot encode request: {e}")))
            }
        };
        let client = self.client.clone();
        let open = async move {
            let conn = client.connection().await?;
            // Room for the whole window plus the final End or Error frame.
            let (tx, rx) = mpsc::channel(window as usize + 1);
            conn.streams().insert(stream_id, tx);
            let guard = StreamGuard::new(conn, stream_id);
            if guard.conn.out.send(request).await.is_err() {
                return Err(ServeError::unavailable(
                    "connection closed before the request was sent",
                ));
            }
            Ok(Open::new(rx, guard, window))
        };
        Box::pin(ClientStream::<Resp>::new(
            open.boxed(),
            &ctx,
            self.client.display.clone(),
        ))
    }
}
