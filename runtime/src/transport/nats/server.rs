//! The serving side of the NATS transport: one instance of one node serves its input
//! ports on their endpoint subjects (in a queue group shared with the node's other
//! instances) and on its own per-instance subjects.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::BytesMut;
use futures::future::BoxFuture;
use futures::stream::{self, SelectAll};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::batch::Batcher;
use super::server_stream::{refusal, Endpoint, Outbox, Typed};
use super::subject::{control_subject, EndpointAddress};
use super::wire::{self, ControlFrame, ServerFrame};
use super::NatsError;
use crate::drain::{Drain, InFlight};
use crate::edge::{Message, RequestContext, Service};
use crate::error::{ErrorKind, ServeError};
use crate::instances::InstanceId;

#[derive(Debug, Clone)]
pub struct NatsServerConfig {
    /// A quiet open stream gets a heartbeat this often, so its caller can tell a slow
    /// worker from a dead one. Keep well under the clients' `idle_timeout`.
    pub heartbeat: Duration,
    /// Calls one endpoint runs at once; more are refused with `Overloaded`.
    pub max_in_flight: usize,
    /// Longest a stream waits for its caller to take responses before it is abandoned
    /// (the caller is presumed gone).
    pub stall_timeout: Duration,
    /// How long shutdown waits for calls in flight before cancelling them.
    pub drain_timeout: Duration,
}

impl Default for NatsServerConfig {
    fn default() -> Self {
        NatsServerConfig {
            heartbeat: Duration::from_millis(1000),
            max_in_flight: 1024,
            stall_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves one node instance's input ports over NATS.
///
/// ```no_run
/// # async fn run(svc: std::sync::Arc<dyn dynamo_runtime::Service<String, String>>) -> Result<(), Box<dyn std::error::Error>> {
/// use dynamo_runtime::transport::nats::{connect, NatsServer};
/// let nats = connect("nats://127.0.0.1:4222").await?;
/// let mut server = NatsServer::new(nats, "prod", "disagg", "decode", 7);
/// server.register::<String, String>("generate", svc)?;
/// let shutdown = tokio_util::sync::CancellationToken::new();
/// let task = server.start(shutdown.clone()).await?; // subscribed once this returns
/// shutdown.cancel();
/// task.await?;
/// # Ok(()) }
/// ```
pub struct NatsServer {
    nats: async_nats::Client,
    namespace: String,
    graph: String,
    node: String,
    instance: InstanceId,
    endpoints: BTreeMap<String, Arc<dyn Endpoint>>,
    config: NatsServerConfig,
    drain: Drain,
}

impl NatsServer {
    pub fn new(
        nats: async_nats::Client,
        namespace: impl Into<String>,
        graph: impl Into<String>,
        node: impl Into<String>,
        instance: InstanceId,
    ) -> Self {
        NatsServer {
            nats,
            namespace: namespace.into(),
            graph: graph.into(),
            node: node.into(),
            instance,
            endpoints: BTreeMap::new(),
            config: NatsServerConfig::default(),
            drain: Drain::new(),
        }
    }

    pub fn with_config(mut self, config: NatsServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Calls in flight on this server right now.
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }

    pub fn instance(&self) -> InstanceId {
        self.instance
    }

    /// The address of one of this server's ports.
    pub fn address(&self, port: &str) -> EndpointAddress {
        EndpointAddress::new(&self.namespace, &self.graph, &self.node, port)
    }

    pub fn register<Req: Message, Resp: Message>(
        &mut self,
        port: &str,
        service: Arc<dyn Service<Req, Resp>>,
    ) -> Result<(), NatsError> {
        if self.endpoints.contains_key(port) {
            return Err(NatsError::DuplicateEndpoint(port.to_string()));
        }
        self.endpoints
            .insert(port.to_string(), Arc::new(Typed { service }));
        Ok(())
    }

    /// Subscribes every port (and waits until the NATS server has the subscriptions), then
    /// serves in a task until `shutdown` fires; the task then unsubscribes, waits up to
    /// the drain timeout for calls in flight and cancels what is left.
    pub async fn start(self, shutdown: CancellationToken) -> Result<JoinHandle<()>, NatsError> {
        let control = Arc::<str>::from(control_subject(
            &self.namespace,
            &self.graph,
            &self.node,
            self.instance,
        ));
        let mut incoming: SelectAll<stream::BoxStream<'static, Incoming>> = SelectAll::new();
        let mut ports = Vec::new();
        for (port, endpoint) in &self.endpoints {
            let address = self.address(port);
            let subject = address.subject();
            let shared = self
                .nats
                .queue_subscribe(subject.clone(), subject.clone())
                .await
                .map_err(|e| NatsError::Subscribe(subject.clone(), e.to_string()))?;
            let own = address.instance_subject(self.instance);
            let mine = self
                .nats
                .subscribe(own.clone())
                .await
                .map_err(|e| NatsError::Subscribe(own, e.to_string()))?;
            let index = ports.len();
            ports.push(Port {
                name: port.clone(),
                endpoint: endpoint.clone(),
                slots: Arc::new(Semaphore::new(self.config.max_in_flight.max(1))),
            });
            incoming.push(shared.map(move |m| (index, m)).boxed());
            incoming.push(mine.map(move |m| (index, m)).boxed());
        }
        let ctl = self
            .nats
            .subscribe(control.to_string())
            .await
            .map_err(|e| NatsError::Subscribe(control.to_string(), e.to_string()))?;
        self.nats
            .flush()
            .await
            .map_err(|e| NatsError::Flush(e.to_string()))?;

        let (batch, batching) = Batcher::start(self.nats.clone());
        let serving = Serving {
            batch,
            batching,
            nats: self.nats,
            instance: self.instance,
            control,
            ports,
            streams: Arc::new(Mutex::new(HashMap::new())),
            drain: self.drain,
            hard_stop: CancellationToken::new(),
            config: self.config,
        };
        Ok(tokio::spawn(serving.run(incoming, ctl, shutdown)))
    }
}

/// A request on one of the ports: the port's index and the message.
type Incoming = (usize, async_nats::Message);

struct Port {
    name: String,
    endpoint: Arc<dyn Endpoint>,
    slots: Arc<Semaphore>,
}

/// A call in flight: how to cancel it, how much it may still send, whether it spoke since
/// the last heartbeat tick.
struct StreamEntry {
    cancel: CancellationToken,
    credits: Arc<Semaphore>,
    window: u32,
    sent: Arc<AtomicBool>,
}

type Streams = Arc<Mutex<HashMap<Arc<str>, StreamEntry>>>;

struct Serving {
    /// Where the streams' response messages go ([`super::batch`]), and its task.
    batch: Batcher,
    batching: JoinHandle<()>,
    nats: async_nats::Client,
    instance: InstanceId,
    control: Arc<str>,
    ports: Vec<Port>,
    streams: Streams,
    drain: Drain,
    hard_stop: CancellationToken,
    config: NatsServerConfig,
}

impl Serving {
    /// Serves until `shutdown`, then drains. The control subscription (`ctl`: cancels,
    /// credit) lives until the calls in flight are done, or a draining stream with more
    /// than its window still to send would wait for credit that never comes.
    async fn run(
        self,
        mut incoming: SelectAll<stream::BoxStream<'static, Incoming>>,
        mut ctl: async_nats::Subscriber,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.config.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.heartbeat(),
                Some(msg) = ctl.next() => self.control(&msg),
                next = incoming.next() => match next {
                    Some((port, msg)) => self.request(port, msg),
                    None => break,
                },
            }
        }
        // Unsubscribes: new calls go to other instances (or get "no responders").
        drop(incoming);
        self.drain.start_draining();
        let drained = tokio::select! {
            idle = self.drain.wait_idle(self.config.drain_timeout) => idle,
            // Keep heartbeating while draining, or callers would give up on live streams;
            // keep taking their credit and cancels.
            _ = async {
                loop {
                    tokio::select! {
                        _ = tick.tick() => self.heartbeat(),
                        Some(msg) = ctl.next() => self.control(&msg),
                    }
                }
            } => false,
        };
        drop(ctl);
        if !drained {
            tracing::warn!(
                in_flight = self.drain.in_flight(),
                "drain timeout elapsed; cancelling remaining calls"
            );
        }
        self.hard_stop.cancel();
        // The batcher ends once the last stream's outbox is gone and its queue is out.
        let Serving {
            batch,
            batching,
            nats,
            ..
        } = self;
        drop(batch);
        if tokio::time::timeout(Duration::from_secs(1), batching)
            .await
            .is_err()
        {
            tracing::warn!("responses still queued for NATS after 1 s; shutting down anyway");
        }
        let _ = nats.flush().await;
    }

    /// Sends a heartbeat on every open stream that sent nothing since the last tick.
    fn heartbeat(&self) {
        let quiet: Vec<Arc<str>> = lock(&self.streams)
            .iter()
            .filter(|(_, e)| !e.sent.swap(false, Ordering::Relaxed))
            .map(|(reply, _)| reply.clone())
            .collect();
        if quiet.is_empty() {
            return;
        }
        let mut buf = BytesMut::new();
        if wire::append(&mut buf, &ServerFrame::Heartbeat, None::<&()>).is_err() {
            return;
        }
        let beat = buf.freeze();
        let nats = self.nats.clone();
        tokio::spawn(async move {
            for reply in quiet {
                let _ = nats.publish(reply.to_string(), beat.clone()).await;
            }
        });
    }

    fn request(&self, port: usize, msg: async_nats::Message) {
        let Some(reply) = msg.reply.clone() else {
            tracing::warn!(subject = %msg.subject, "request without a reply subject; dropped");
            return;
        };
        let Some(port) = self.ports.get(port) else {
            return;
        };
        let (request_id, traceparent, batchable) = context_headers(msg.headers.as_ref());
        let refuse = |error: ServeError| {
            let nats = self.nats.clone();
            let reply = reply.clone();
            tokio::spawn(async move { nats.publish(reply, refusal(error)).await });
        };
        let Ok(slot) = port.slots.clone().try_acquire_owned() else {
            refuse(ServeError::new(
                ErrorKind::Overloaded,
                format!(
                    "`{}` already runs {} calls on instance {:x}",
                    port.name, self.config.max_in_flight, self.instance
                ),
            ));
            return;
        };
        let Some(in_flight) = self.drain.try_enter() else {
            refuse(ServeError::unavailable("instance is shutting down"));
            return;
        };
        let (head, payload) = match wire::decode_request(&msg.payload) {
            Ok(decoded) => decoded,
            Err(e) => {
                refuse(ServeError::invalid(format!("malformed request: {e}")));
                return;
            }
        };
        let token = self.hard_stop.child_token();
        let ctx = RequestContext::with_token(request_id, traceparent, token.clone());
        let span = tracing::info_span!(
            "serve",
            transport = "nats",
            endpoint = %port.name,
            instance = self.instance,
            request_id = %ctx.request_id,
        );
        let window = head.window.clamp(1, crate::transport::frame::MAX_WINDOW);
        let credits = Arc::new(Semaphore::new(window as usize));
        let sent = Arc::new(AtomicBool::new(true));
        let out = Outbox {
            batch: self.batch.clone(),
            batchable,
            reply: reply.clone(),
            instance: self.instance,
            control: self.control.clone(),
            credits: credits.clone(),
            sent: sent.clone(),
            stall_timeout: self.config.stall_timeout,
        };
        match port.endpoint.open(payload, ctx, out) {
            Ok(pump) => {
                let key: Arc<str> = Arc::from(reply.as_str());
                let entry = StreamEntry {
                    cancel: token,
                    credits,
                    window,
                    sent,
                };
                if let Some(old) = lock(&self.streams).insert(key.clone(), entry) {
                    old.cancel.cancel();
                }
                let streams = self.streams.clone();
                tokio::spawn(finish(pump, streams, key, in_flight, slot).instrument(span));
            }
            Err(e) => refuse(ServeError::invalid(format!(
                "cannot decode request for `{}`: {e}",
                port.name
            ))),
        }
    }

    fn control(&self, msg: &async_nats::Message) {
        match wire::decode_control(&msg.payload) {
            Ok(ControlFrame::Cancel { stream }) => {
                if let Some(entry) = lock(&self.streams).remove(stream) {
                    entry.cancel.cancel();
                }
            }
            Ok(ControlFrame::Credit { stream, n }) => {
                if let Some(entry) = lock(&self.streams).get(stream) {
                    // Never beyond the window: a confused client cannot unbound the stream.
                    let available =
                        u32::try_from(entry.credits.available_permits()).unwrap_or(u32::MAX);
                    let n = n.min(entry.window.saturating_sub(available));
                    entry.credits.add_permits(n as usize);
                }
            }
            Err(e) => tracing::warn!(error = %e, "malformed control message; ignored"),
        }
    }
}

/// The request id, trace context and batch opt-in a request carries in its NATS headers.
fn context_headers(headers: Option<&HeaderMap>) -> (String, Option<String>, bool) {
    let get = |name: &str| {
        headers
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    (
        get(wire::REQUEST_ID).unwrap_or_default(),
        get(wire::TRACEPARENT),
        get(wire::BATCH).is_some_and(|v| v == "1"),
    )
}

async fn finish(
    pump: BoxFuture<'static, ()>,
    streams: Streams,
    key: Arc<str>,
    in_flight: InFlight,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    pump.await;
    lock(&streams).remove(&key);
    drop(in_flight);
    drop(slot);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
