//! The calling side of the local socket transport. One client holds one connection to a
//! server and multiplexes every call over it; each endpoint handle is an
//! `Arc<dyn Service<Req, Resp>>`, so the node that holds it never sees the transport.
//!
//! If the connection dies, every stream in flight ends with `Unavailable` and the next
//! call reconnects (bounded by the connect timeout).

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::frame::{self, Header, StreamId};
use super::writer::write_frames;
use crate::edge::{error_stream, Message, RequestContext, ResponseStream, Service};
use crate::error::ServeError;

#[derive(Debug, Clone)]
pub struct SocketClientConfig {
    /// Longest a (re)connect may take before the call fails with `Unavailable`.
    pub connect_timeout: Duration,
    /// Response items buffered per stream before the connection's reader waits for the
    /// consumer (backpressure; a stalled consumer stalls its whole connection).
    pub stream_buffer: usize,
    /// Frames queued for the writer before callers wait.
    pub write_queue: usize,
}

impl Default for SocketClientConfig {
    fn default() -> Self {
        SocketClientConfig {
            connect_timeout: Duration::from_secs(2),
            stream_buffer: 64,
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

struct ClientInner {
    path: PathBuf,
    config: SocketClientConfig,
    current: ArcSwapOption<Connection>,
    reconnect: tokio::sync::Mutex<()>,
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
        SocketClient {
            inner: Arc::new(ClientInner {
                path: path.as_ref().to_path_buf(),
                config,
                current: ArcSwapOption::empty(),
                reconnect: tokio::sync::Mutex::new(()),
                next_stream: AtomicU64::new(1),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
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
    async fn connection(&self) -> Result<Arc<Connection>, ServeError> {
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let _one_at_a_time = self.reconnect.lock().await;
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let path = self.path.display();
        let stream = match tokio::time::timeout(
            self.config.connect_timeout,
            UnixStream::connect(&self.path),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(ServeError::unavailable(format!(
                    "cannot connect to {path}: {e}"
                )))
            }
            Err(_) => {
                let t = self.config.connect_timeout;
                return Err(ServeError::unavailable(format!(
                    "connecting to {path} timed out after {t:?}"
                )));
            }
        };
        let conn = Connection::start(stream, &self.config);
        self.current.store(Some(conn.clone()));
        Ok(conn)
    }

    fn live(&self) -> Option<Arc<Connection>> {
        self.current
            .load_full()
            .filter(|c| !c.closed.is_cancelled())
    }
}

enum Incoming {
    Item(Bytes),
    End,
    Error(ServeError),
}

struct Connection {
    out: mpsc::Sender<Bytes>,
    streams: Mutex<HashMap<StreamId, mpsc::Sender<Incoming>>>,
    closed: CancellationToken,
    stream_buffer: usize,
}

impl Connection {
    fn start(stream: UnixStream, config: &SocketClientConfig) -> Arc<Self> {
        let (rd, wr) = stream.into_split();
        let (out, queue) = mpsc::channel(config.write_queue.max(1));
        let conn = Arc::new(Connection {
            out,
            streams: Mutex::new(HashMap::new()),
            closed: CancellationToken::new(),
            stream_buffer: config.stream_buffer.max(1),
        });
        tokio::spawn(write_frames(wr, queue, conn.closed.clone()));
        tokio::spawn(read_frames(rd, conn.clone()));
        conn
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, mpsc::Sender<Incoming>>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn deliver(&self, id: StreamId, item: Incoming, last: bool) {
        let tx = if last {
            self.streams().remove(&id)
        } else {
            self.streams().get(&id).cloned()
        };
        // No entry: the caller dropped the stream and a Cancel is on its way.
        if let Some(tx) = tx {
            let _ = tx.send(item).await;
        }
    }
}

/// Routes incoming frames to their streams until the connection ends, then drops every
/// stream's sender so each one ends with `Unavailable`.
async fn read_frames(rd: OwnedReadHalf, conn: Arc<Connection>) {
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
        match header {
            Header::Response { stream_id } => {
                let item = bytes.slice(bytes.len() - payload.len()..);
                conn.deliver(stream_id, Incoming::Item(item), false).await;
            }
            Header::End { stream_id } => conn.deliver(stream_id, Incoming::End, true).await,
            Header::Error { stream_id, error } => {
                conn.deliver(stream_id, Incoming::Error(error), true).await
            }
            other => {
                tracing::error!(frame = ?other, "unexpected frame from a server; closing socket connection");
                break;
            }
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
        let header = Header::Request {
            stream_id,
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
            let (tx, rx) = mpsc::channel(conn.stream_buffer);
            conn.streams().insert(stream_id, tx);
            let guard = StreamGuard {
                conn,
                stream_id,
                finished: false,
            };
            if guard.conn.out.send(request).await.is_err() {
                return Err(ServeError::unavailable(
                    "connection closed before the request was sent",
                ));
            }
            Ok(Open { rx, guard })
        };
        Box::pin(ClientStream::<Resp> {
            state: State::Opening(open.boxed()),
            cancelled: Box::pin(ctx.cancellation_token().cancelled_owned()),
            path: self.client.clone(),
            _types: PhantomData,
        })
    }
}

struct Open {
    rx: mpsc::Receiver<Incoming>,
    guard: StreamGuard,
}

/// Unregisters a stream and, unless it ended on its own, tells the server to cancel it.
struct StreamGuard {
    conn: Arc<Connection>,
    stream_id: StreamId,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.conn.streams().remove(&self.stream_id);
        if self.finished || self.conn.closed.is_cancelled() {
            return;
        }
        let header = Header::Cancel {
            stream_id: self.stream_id,
        };
        let Ok(frame) = frame::encode(&mut BytesMut::new(), &header, None::<&()>) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(frame)) = self.conn.out.try_send(frame) {
            // The writer is busy: queue the cancel behind the frames already waiting.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let out = self.conn.out.clone();
                rt.spawn(async move { out.send(frame).await });
            }
        }
    }
}

enum State {
    Opening(BoxFuture<'static, Result<Open, ServeError>>),
    Open(Open),
    Done,
}

struct ClientStream<Resp> {
    state: State,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    path: Arc<ClientInner>,
    _types: PhantomData<fn() -> Resp>,
}

impl<Resp: Message> ClientStream<Resp> {
    fn finish(
        &mut self,
        item: Option<Result<Resp, ServeError>>,
        ended_by_server: bool,
    ) -> Poll<Option<Result<Resp, ServeError>>> {
        if let State::Open(open) = &mut self.state {
            open.guard.finished = ended_by_server;
        }
        self.state = State::Done;
        Poll::Ready(item)
    }
}

impl<Resp: Message> Stream for ClientStream<Resp> {
    type Item = Result<Resp, ServeError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Opening(open) => match open.as_mut().poll(cx) {
                    Poll::Ready(Ok(o)) => this.state = State::Open(o),
                    Poll::Ready(Err(e)) => return this.finish(Some(Err(e)), true),
                    Poll::Pending => {
                        if this.cancelled.as_mut().poll(cx).is_ready() {
                            return this.finish(Some(Err(ServeError::cancelled())), false);
                        }
                        return Poll::Pending;
                    }
                },
                State::Open(open) => {
                    return match open.rx.poll_recv(cx) {
                        Poll::Ready(Some(Incoming::Item(bytes))) => {
                            match frame::decode_payload(&bytes) {
                                Ok(item) => Poll::Ready(Some(Ok(item))),
                                Err(e) => {
                                    let msg = format!("cannot decode response: {e}");
                                    this.finish(Some(Err(ServeError::internal(msg))), false)
                                }
                            }
                        }
                        Poll::Ready(Some(Incoming::End)) => this.finish(None, true),
                        Poll::Ready(Some(Incoming::Error(e))) => this.finish(Some(Err(e)), true),
                        Poll::Ready(None) => {
                            let msg = format!(
                                "connection to {} lost mid-stream",
                                this.path.path.display()
                            );
                            this.finish(Some(Err(ServeError::unavailable(msg))), true)
                        }
                        Poll::Pending => {
                            if this.cancelled.as_mut().poll(cx).is_ready() {
                                return this.finish(Some(Err(ServeError::cancelled())), false);
                            }
                            Poll::Pending
                        }
                    };
                }
            }
        }
    }
}
