//! The calling side of the NATS transport. One client holds one inbox subscription and
//! demultiplexes every call's responses from it; each endpoint handle is an
//! `Arc<dyn Service<Req, Resp>>`, so the node that holds it never sees the transport.
//!
//! Nothing hangs silently: a call whose worker sends nothing (not even a heartbeat) for
//! `idle_timeout` ends with `Unavailable`, and so does one with a gap in its sequence
//! numbers or with no instance serving its subject. NATS reconnects on its own; calls
//! made after it is back succeed.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client_stream::{ClientStream, Incoming, Open, StreamGuard};
use super::subject::EndpointAddress;
use super::wire::{self, ControlFrame, Frames, Parts, RequestHead, ServerFrame};
use super::NatsError;
use crate::edge::{error_stream, Message, RequestContext, ResponseStream, Service};
use crate::error::ServeError;
use crate::instances::InstanceId;
use crate::transport::frame::MAX_WINDOW;

#[derive(Debug, Clone)]
pub struct NatsClientConfig {
    /// Responses a server may send on one call ahead of its consumer (at most 4096).
    pub stream_window: usize,
    /// A call that hears nothing from its worker (no response, no heartbeat) for this
    /// long ends with `Unavailable`. Keep well above the servers' heartbeat.
    pub idle_timeout: Duration,
    /// Calls one endpoint handle has open at once; more wait for a slot (cancellable).
    pub max_in_flight: usize,
}

impl Default for NatsClientConfig {
    fn default() -> Self {
        NatsClientConfig {
            stream_window: 64,
            idle_timeout: Duration::from_secs(5),
            max_in_flight: 1024,
        }
    }
}

/// Calls endpoints over NATS.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use dynamo_runtime::transport::nats::{connect, EndpointAddress, NatsClient, NatsClientConfig};
/// use dynamo_runtime::RequestContext;
/// use futures::StreamExt;
/// let client = NatsClient::new(connect("nats://127.0.0.1:4222").await?, NatsClientConfig::default()).await?;
/// let decode = EndpointAddress::new("prod", "disagg", "decode", "generate");
/// let generate = client.endpoint::<String, String>(&decode);
/// let mut stream = generate.call("hi".into(), RequestContext::new("req-1"));
/// while let Some(item) = stream.next().await { let _ = item?; }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    shared: Arc<Shared>,
    next_stream: AtomicU64,
    closed: CancellationToken,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// What the reader task and the streams share.
pub(super) struct Shared {
    pub(super) nats: async_nats::Client,
    inbox: String,
    config: NatsClientConfig,
    slots: Mutex<HashMap<u64, Slot>>,
    /// Cancel and credit messages, sent in order by one task.
    control: mpsc::UnboundedSender<(Arc<str>, Bytes)>,
}

/// One call waiting for frames.
struct Slot {
    tx: mpsc::Sender<Incoming>,
    next_seq: u64,
    last_seen: Instant,
    /// Where to send cancellation, once the server said.
    control: Option<Arc<str>>,
    instance: Option<u64>,
    /// The caller dropped the call before it was accepted: cancel it when it is.
    dropped: bool,
    target: Arc<str>,
}

impl NatsClient {
    /// Subscribes this client's inbox; calls can be made once this returns.
    pub async fn new(
        nats: async_nats::Client,
        config: NatsClientConfig,
    ) -> Result<Self, NatsError> {
        let inbox = nats.new_inbox();
        let sub = nats
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| NatsError::Subscribe(format!("{inbox}.*"), e.to_string()))?;
        nats.flush()
            .await
            .map_err(|e| NatsError::Flush(e.to_string()))?;
        let (control, control_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            nats,
            inbox,
            config,
            slots: Mutex::new(HashMap::new()),
            control,
        });
        let closed = CancellationToken::new();
        tokio::spawn(read(sub, shared.clone(), closed.clone()));
        tokio::spawn(send_control(shared.nats.clone(), control_rx));
        Ok(NatsClient {
            inner: Arc::new(ClientInner {
                shared,
                next_stream: AtomicU64::new(1),
                closed,
            }),
        })
    }

    /// A handle on an endpoint: each call goes to whichever instance takes it first.
    pub fn endpoint<Req: Message, Resp: Message>(
        &self,
        address: &EndpointAddress,
    ) -> Arc<dyn Service<Req, Resp>> {
        self.on_subject(address.subject())
    }

    /// A handle on one instance of an endpoint (a router's choice).
    pub fn instance_endpoint<Req: Message, Resp: Message>(
        &self,
        address: &EndpointAddress,
        instance: InstanceId,
    ) -> Arc<dyn Service<Req, Resp>> {
        self.on_subject(address.instance_subject(instance))
    }

    /// [`NatsClient::instance_endpoint`] with its own bound on calls open at once (an
    /// edge's queue size) instead of the client's `max_in_flight`.
    pub fn bounded_instance_endpoint<Req: Message, Resp: Message>(
        &self,
        address: &EndpointAddress,
        instance: InstanceId,
        max_in_flight: usize,
    ) -> Arc<dyn Service<Req, Resp>> {
        self.bounded(address.instance_subject(instance), max_in_flight)
    }

    fn on_subject<Req: Message, Resp: Message>(
        &self,
        subject: String,
    ) -> Arc<dyn Service<Req, Resp>> {
        self.bounded(subject, self.inner.shared.config.max_in_flight)
    }

    fn bounded<Req: Message, Resp: Message>(
        &self,
        subject: String,
        max_in_flight: usize,
    ) -> Arc<dyn Service<Req, Resp>> {
        let slots = max_in_flight.max(1);
        Arc::new(Endpoint::<Req, Resp> {
            client: self.inner.clone(),
            subject: subject.into(),
            slots: Arc::new(Semaphore::new(slots)),
            _types: PhantomData,
        })
    }
}

impl Shared {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn send_control(&self, to: &Arc<str>, frame: &ControlFrame<'_>) {
        if let Ok(body) = wire::encode_control(frame) {
            let _ = self.control.send((to.clone(), body));
        }
    }

    fn reply_subject(&self, stream_id: u64) -> String {
        format!("{}.{stream_id}", self.inbox)
    }

    /// The stream's guard is gone: forget it, and cancel it on the server if it did not
    /// end on its own.
    pub(super) fn release(&self, stream_id: u64, control: Option<&Arc<str>>, finished: bool) {
        let mut slots = self.slots();
        if finished {
            slots.remove(&stream_id);
            return;
        }
        let control = control
            .cloned()
            .or_else(|| slots.get(&stream_id).and_then(|s| s.control.clone()));
        match control {
            Some(control) => {
                slots.remove(&stream_id);
                drop(slots);
                let stream = self.reply_subject(stream_id);
                self.send_control(&control, &ControlFrame::Cancel { stream: &stream });
            }
            // Not accepted yet: cancel when the server says who took it.
            None => {
                if let Some(slot) = slots.get_mut(&stream_id) {
                    slot.dropped = true;
                }
            }
        }
    }

    /// Credit for `n` more responses on `stream_id`.
    pub(super) fn credit(&self, stream_id: u64, control: &Arc<str>, n: u32) {
        let stream = self.reply_subject(stream_id);
        self.send_control(control, &ControlFrame::Credit { stream: &stream, n });
    }
}

async fn send_control(
    nats: async_nats::Client,
    mut rx: mpsc::UnboundedReceiver<(Arc<str>, Bytes)>,
) {
    while let Some((to, body)) = rx.recv().await {
        let _ = nats.publish(to.to_string(), body).await;
    }
}

/// Routes response messages to their calls; every `idle_timeout / 4` ends the calls that
/// heard nothing for `idle_timeout`.
async fn read(mut sub: async_nats::Subscriber, shared: Arc<Shared>, closed: CancellationToken) {
    let idle = shared.config.idle_timeout;
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = closed.cancelled() => break,
            _ = tick.tick() => sweep(&shared, idle),
            msg = sub.next() => match msg {
                Some(msg) => route(&shared, msg),
                None => break,
            },
        }
    }
    // Every call still open ends with `Unavailable` when its sender goes.
    shared.slots().clear();
}

fn sweep(shared: &Shared, idle: Duration) {
    let now = Instant::now();
    let connected = matches!(
        shared.nats.connection_state(),
        async_nats::connection::State::Connected
    );
    let mut slots = shared.slots();
    let dead: Vec<u64> = slots
        .iter()
        .filter(|(_, s)| now.duration_since(s.last_seen) > idle)
        .map(|(id, _)| *id)
        .collect();
    for id in dead {
        let Some(slot) = slots.remove(&id) else {
            continue;
        };
        if let Some(control) = &slot.control {
            let stream = shared.reply_subject(id);
            shared.send_control(control, &ControlFrame::Cancel { stream: &stream });
        }
        if slot.dropped {
            continue;
        }
        let who = match slot.instance {
            Some(i) => format!("instance {i:x} of {}", slot.target),
            None => format!("any instance of {}", slot.target),
        };
        let why = if connected {
            "presumed dead"
        } else {
            "the NATS connection is down"
        };
        let error = ServeError::unavailable(format!(
            "nothing from {who} for {idle:?} (no response, no heartbeat): {why}"
        ));
        let _ = slot.tx.try_send(Incoming::Error(error));
    }
}

fn route(shared: &Shared, msg: async_nats::Message) {
    let Some((_, last)) = msg.subject.rsplit_once('.') else {
        return;
    };
    if last == wire::BATCH_SUFFIX {
        let mut parts = Parts::new(msg.payload);
        let mut slots = shared.slots();
        while let Some(part) = parts.next_part() {
            match part {
                Ok((stream_id, body)) => route_message(shared, &mut slots, stream_id, body, false),
                Err(e) => {
                    tracing::warn!(error = %e, "malformed NATS response batch; the rest dropped");
                    break;
                }
            }
        }
        return;
    }
    let Ok(stream_id) = last.parse::<u64>() else {
        return;
    };
    let no_responders = msg.status == Some(StatusCode::NO_RESPONDERS);
    route_message(
        shared,
        &mut shared.slots(),
        stream_id,
        msg.payload,
        no_responders,
    );
}

/// Hands the frames of one response message to its call.
fn route_message(
    shared: &Shared,
    slots: &mut HashMap<u64, Slot>,
    stream_id: u64,
    payload: Bytes,
    no_responders: bool,
) {
    let Some(slot) = slots.get_mut(&stream_id) else {
        // A call already ended or dropped; late frames are expected.
        return;
    };
    slot.last_seen = Instant::now();
    if no_responders {
        let error = ServeError::unavailable(format!("no instance serves {}", slot.target));
        let _ = slot.tx.try_send(Incoming::Error(error));
        slots.remove(&stream_id);
        return;
    }
    let mut frames = Frames::new(payload);
    let mut end = false;
    while let Some(frame) = frames.next_frame() {
        let (incoming, last) = match decode(slot, frame) {
            Ok(Some(step)) => step,
            Ok(None) => continue,
            Err(error) => (Incoming::Error(error), true),
        };
        if let Incoming::Accepted { control, .. } = &incoming {
            if slot.dropped {
                let stream = shared.reply_subject(stream_id);
                shared.send_control(control, &ControlFrame::Cancel { stream: &stream });
                end = true;
                break;
            }
        }
        match slot.tx.try_send(incoming) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::error!(stream_id, target = %slot.target, "server overran the flow-control window");
                end = true;
                break;
            }
            // The caller dropped the stream; its guard sends the cancel.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
        if last {
            end = true;
            break;
        }
    }
    if end {
        slots.remove(&stream_id);
    }
}

/// Checks one frame's sequence number and turns it into what its stream receives
/// (`None` for a heartbeat). The bool says whether it ends the stream.
fn decode(
    slot: &mut Slot,
    frame: Result<Bytes, wire::WireError>,
) -> Result<Option<(Incoming, bool)>, ServeError> {
    let frame = frame.map_err(|e| ServeError::internal(format!("from {}: {e}", slot.target)))?;
    let (header, payload) = wire::decode_frame(&frame)
        .map_err(|e| ServeError::internal(format!("from {}: {e}", slot.target)))?;
    if let Some(seq) = header.seq() {
        if seq != slot.next_seq {
            return Err(ServeError::unavailable(format!(
                "responses from {} were lost: expected frame {}, got {seq}",
                slot.target, slot.next_seq
            )));
        }
        slot.next_seq += 1;
    }
    Ok(match header {
        ServerFrame::Accepted {
            instance, control, ..
        } => {
            let control: Arc<str> = control.into();
            slot.control = Some(control.clone());
            slot.instance = Some(instance);
            Some((Incoming::Accepted { control }, false))
        }
        ServerFrame::Item { .. } => {
            let item = frame.slice(frame.len() - payload.len()..);
            Some((Incoming::Item(item), false))
        }
        ServerFrame::End { .. } => Some((Incoming::End, true)),
        ServerFrame::Error { error, .. } => Some((Incoming::Error(error), true)),
        ServerFrame::Heartbeat => None,
    })
}

struct Endpoint<Req, Resp> {
    client: Arc<ClientInner>,
    subject: Arc<str>,
    slots: Arc<Semaphore>,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req: Message, Resp: Message> Service<Req, Resp> for Endpoint<Req, Resp> {
    fn call(&self, req: Req, ctx: RequestContext) -> ResponseStream<Resp> {
        let shared = self.client.shared.clone();
        let stream_id = self.client.next_stream.fetch_add(1, Ordering::Relaxed);
        let window = u32::try_from(shared.config.stream_window)
            .unwrap_or(MAX_WINDOW)
            .clamp(1, MAX_WINDOW);
        let payload = match wire::encode_request(RequestHead { window }, &req) {
            Ok(p) => p,
            Err(e) => {
                return error_stream(ServeError::invalid(format!("cannot encode request: {e}")))
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(wire::REQUEST_ID, ctx.request_id.as_str());
        headers.insert(wire::BATCH, "1");
        if let Some(tp) = &ctx.traceparent {
            headers.insert(wire::TRACEPARENT, tp.as_str());
        }
        let subject = self.subject.clone();
        let slots = self.slots.clone();
        let cancel = ctx.cancellation_token();
        let open = async move {
            let permit = tokio::select! {
                p = slots.acquire_owned() => p.map_err(|_| ServeError::unavailable("client closed"))?,
                _ = cancel.cancelled() => return Err(ServeError::cancelled()),
            };
            // Room for the whole window plus Accepted and the final frame.
            let (tx, rx) = mpsc::channel(window as usize + 2);
            shared.slots().insert(
                stream_id,
                Slot {
                    tx,
                    next_seq: 0,
                    last_seen: Instant::now(),
                    control: None,
                    instance: None,
                    dropped: false,
                    target: subject.clone(),
                },
            );
            let guard = StreamGuard::new(shared.clone(), stream_id);
            let reply = shared.reply_subject(stream_id);
            shared
                .nats
                .publish_with_reply_and_headers(subject.to_string(), reply, headers, payload)
                .await
                .map_err(|e| ServeError::unavailable(format!("cannot send to {subject}: {e}")))?;
            Ok(Open::new(rx, guard, window, permit))
        };
        Box::pin(ClientStream::<Resp>::new(
            open.boxed(),
            &ctx,
            self.subject.clone(),
        ))
    }
}
