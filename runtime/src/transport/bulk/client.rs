//! The calling side: one connection per client, dialed on first use and again after it
//! breaks, its address resolved at every dial.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{frame_head, Bulk, BulkField, CallHead, CALL, CANCEL, MAX_HEAD, PREFACE};
use crate::transport::dial::DialGate;
use crate::transport::socket_client::Resolve;
use crate::{Message, RequestContext, ResponseStream, ServeError, Service};

#[derive(Debug, Clone)]
pub struct BulkClientConfig {
    pub connect_timeout: Duration,
    /// How long a call waits for its answer once sent: a peer that vanished without
    /// closing the connection fails the call instead of hanging it.
    pub answer_timeout: Duration,
}

impl Default for BulkClientConfig {
    fn default() -> Self {
        BulkClientConfig {
            connect_timeout: Duration::from_secs(2),
            answer_timeout: Duration::from_secs(60),
        }
    }
}

/// A client of one [`super::BulkServer`]; [`BulkClient::endpoint`] hands out its
/// endpoints as services.
pub struct BulkClient<Req, Resp> {
    inner: Arc<Inner<Req, Resp>>,
}

struct Inner<Req, Resp> {
    name: String,
    resolve: Resolve,
    field: BulkField<Req>,
    config: BulkClientConfig,
    current: Mutex<Option<Arc<Conn<Resp>>>>,
    dialing: DialGate,
}

type Answer<Resp> = Result<Resp, ServeError>;

struct Conn<Resp> {
    out: mpsc::Sender<Outgoing>,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Answer<Resp>>>>,
    next: AtomicU64,
    closed: CancellationToken,
}

enum Outgoing {
    Call { head: Vec<u8>, bulk: Bulk },
    Cancel(u64),
}

impl<Req: Message, Resp: Message> BulkClient<Req, Resp> {
    /// A client of the server `resolve` finds (called at every dial); `name` says who it
    /// is in errors.
    pub fn new(
        name: &str,
        resolve: Resolve,
        field: BulkField<Req>,
        config: BulkClientConfig,
    ) -> Self {
        BulkClient {
            inner: Arc::new(Inner {
                name: name.to_string(),
                resolve,
                field,
                config,
                current: Mutex::new(None),
                dialing: DialGate::default(),
            }),
        }
    }

    pub fn endpoint(&self, endpoint: &str) -> Arc<dyn Service<Req, Resp>> {
        Arc::new(Endpoint {
            inner: self.inner.clone(),
            endpoint: endpoint.to_string(),
        })
    }
}

impl<Req, Resp> Drop for Inner<Req, Resp> {
    fn drop(&mut self) {
        if let Some(conn) = lock(&self.current).take() {
            conn.closed.cancel();
        }
    }
}

impl<Req: Message, Resp: Message> Inner<Req, Resp> {
    fn live(&self) -> Option<Arc<Conn<Resp>>> {
        lock(&self.current)
            .as_ref()
            .filter(|c| !c.closed.is_cancelled())
            .cloned()
    }

    async fn connection(&self) -> Result<Arc<Conn<Resp>>, ServeError> {
        self.dialing.connect(|| self.live(), || self.dial()).await
    }

    async fn dial(&self) -> Result<Arc<Conn<Resp>>, ServeError> {
        let timeout = self.config.connect_timeout;
        let dial = async {
            let addr = (self.resolve)().await?;
            let mut stream = TcpStream::connect(&addr).await.map_err(|e| {
                ServeError::unavailable(format!("cannot connect to {} at {addr}: {e}", self.name))
            })?;
            let _ = stream.set_nodelay(true);
            stream.write_all(PREFACE).await.map_err(|e| {
                ServeError::unavailable(format!("cannot write to {} at {addr}: {e}", self.name))
            })?;
            Ok::<_, ServeError>(stream)
        };
        let stream = tokio::time::timeout(timeout, dial).await.map_err(|_| {
            ServeError::unavailable(format!(
                "connecting to {} timed out after {timeout:?}",
                self.name
            ))
        })??;
        let (rd, wr) = stream.into_split();
        let (out, queue) = mpsc::channel(16);
        let conn = Arc::new(Conn {
            out,
            waiting: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            closed: CancellationToken::new(),
        });
        tokio::spawn(write_calls(wr, queue, conn.closed.clone()));
        tokio::spawn(read_answers(rd, conn.clone(), self.name.clone()));
        *lock(&self.current) = Some(conn.clone());
        Ok(conn)
    }
}

struct Endpoint<Req, Resp> {
    inner: Arc<Inner<Req, Resp>>,
    endpoint: String,
}

impl<Req: Message, Resp: Message> Service<Req, Resp> for Endpoint<Req, Resp> {
    fn call(&self, req: Req, ctx: RequestContext) -> ResponseStream<Resp> {
        let (inner, endpoint) = (self.inner.clone(), self.endpoint.clone());
        Box::pin(futures::stream::once(call(inner, endpoint, req, ctx)))
    }
}

async fn call<Req: Message, Resp: Message>(
    inner: Arc<Inner<Req, Resp>>,
    endpoint: String,
    mut request: Req,
    ctx: RequestContext,
) -> Answer<Resp> {
    if ctx.is_cancelled() {
        return Err(ServeError::cancelled());
    }
    let conn = inner.connection().await?;
    let id = conn.next.fetch_add(1, Ordering::Relaxed);
    let bulk = (inner.field.take)(&mut request);
    let head = CallHead {
        call: id,
        endpoint,
        request_id: ctx.request_id.clone(),
        traceparent: ctx.traceparent.clone(),
        request,
    };
    let head = postcard::to_allocvec(&head)
        .map_err(|e| ServeError::internal(format!("cannot encode a bulk call: {e}")))?;
    if head.len() > MAX_HEAD {
        return Err(ServeError::invalid(format!(
            "a request of {} bytes besides its bulk exceeds {MAX_HEAD}",
            head.len()
        )));
    }
    let (tx, rx) = oneshot::channel();
    lock(&conn.waiting).insert(id, tx);
    // From here on, dropping this future tells the server to cancel the call.
    let mut pending = Pending {
        conn: &conn,
        id,
        done: false,
    };
    let sent = tokio::select! {
        _ = ctx.cancelled() => Err(ServeError::cancelled()),
        sent = conn.out.send(Outgoing::Call { head, bulk }) => sent.map_err(|_| broken(&inner.name)),
    };
    if let Err(e) = sent {
        pending.done = lock(&conn.waiting).remove(&id).is_none();
        return Err(e);
    }
    let timeout = inner.config.answer_timeout;
    let answer = tokio::select! {
        _ = ctx.cancelled() => return Err(ServeError::cancelled()),
        a = tokio::time::timeout(timeout, rx) => a,
    };
    pending.done = true;
    match answer {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err(broken(&inner.name)),
        Err(_) => {
            lock(&conn.waiting).remove(&id);
            // The connection may be stuck behind a vanished peer: the next call dials anew.
            conn.closed.cancel();
            Err(ServeError::unavailable(format!(
                "{} did not answer within {timeout:?}",
                inner.name
            )))
        }
    }
}

fn broken(name: &str) -> ServeError {
    ServeError::unavailable(format!("the connection to {name} broke"))
}

/// A call sent and not yet answered: dropped early, it cancels the call on the server.
struct Pending<'a, Resp> {
    conn: &'a Conn<Resp>,
    id: u64,
    done: bool,
}

impl<Resp> Drop for Pending<'_, Resp> {
    fn drop(&mut self) {
        if !self.done && lock(&self.conn.waiting).remove(&self.id).is_some() {
            let _ = self.conn.out.try_send(Outgoing::Cancel(self.id));
        }
    }
}

/// Writes the queued calls, each bulk straight from its buffer, until `closed` fires or
/// a write fails (which closes the connection).
async fn write_calls(
    mut wr: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Outgoing>,
    closed: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = closed.cancelled() => break,
            n = queue.recv() => match n { Some(n) => n, None => break },
        };
        let (kind, head, bulk) = match next {
            Outgoing::Call { head, bulk } => (CALL, head, bulk),
            Outgoing::Cancel(id) => (CANCEL, id.to_le_bytes().to_vec(), Bulk::Owned(Vec::new())),
        };
        let mut first = Vec::with_capacity(super::FRAME_HEAD + head.len());
        first.extend_from_slice(&frame_head(kind, head.len(), bulk.len()));
        first.extend_from_slice(&head);
        let written = async {
            wr.write_all(&first).await?;
            match &bulk {
                Bulk::Owned(bytes) => wr.write_all(bytes).await,
                Bulk::Parts(parts) => {
                    for part in parts {
                        wr.write_all(part).await?;
                    }
                    Ok(())
                }
            }
        };
        let result = tokio::select! {
            _ = closed.cancelled() => break,
            r = written => r,
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "bulk call write failed; closing connection");
            break;
        }
    }
    closed.cancel();
    let _ = wr.shutdown().await;
}

/// Hands each answer to its call until the connection ends; then fails every call still
/// waiting (their senders are dropped) and marks the connection closed.
async fn read_answers<Resp: Message>(
    mut rd: impl AsyncRead + Unpin,
    conn: Arc<Conn<Resp>>,
    name: String,
) {
    let result = tokio::select! {
        _ = conn.closed.cancelled() => Ok(()),
        r = read_loop(&mut rd, &conn) => r,
    };
    if let Err(e) = result {
        tracing::warn!(peer = %name, error = %e, "bulk connection closed");
    }
    conn.closed.cancel();
    lock(&conn.waiting).clear();
}

async fn read_loop<Resp: Message>(
    rd: &mut (impl AsyncRead + Unpin),
    conn: &Conn<Resp>,
) -> Result<(), String> {
    let mut body = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if rd.read(&mut len[..1]).await.map_err(|e| e.to_string())? == 0 {
            return Ok(());
        }
        rd.read_exact(&mut len[1..])
            .await
            .map_err(|e| e.to_string())?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_HEAD {
            return Err(format!("an answer of {len} bytes exceeds {MAX_HEAD}"));
        }
        body.resize(len, 0);
        rd.read_exact(&mut body).await.map_err(|e| e.to_string())?;
        let (id, answer): (u64, Answer<Resp>) =
            postcard::from_bytes(&body).map_err(|e| format!("a malformed answer: {e}"))?;
        if let Some(tx) = lock(&conn.waiting).remove(&id) {
            let _ = tx.send(answer);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
