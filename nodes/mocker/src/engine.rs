//! The async shell: one tokio task owns the scheduler and runs its steps, sleeping as long
//! as the timing model says (never in instant mode). Requests and aborts reach it over one
//! channel, tokens leave on one channel per request, KV events on a broadcast, counters
//! through atomics. Nothing on the hot path takes a lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynamo_protocol::{KvEvent, TokenDelta, TokenRequest};
use dynamo_runtime::{RequestContext, ResponseStream, ServeError, Service};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::block_manager::KvSnapshot;
use crate::config::{ConfigError, MockerConfig};
use crate::scheduler::{RequestLimits, Scheduler, SeqOutput};
use crate::sequence::{NewSequence, SeqId};
use crate::stats::{MockerStats, StatsCell};
use crate::stream::{Control, DeltaResult, DeltaStream};
use crate::timing::step_duration;

/// Why the engine could not start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("invalid mocker settings: {}", join(.0))]
    Config(Vec<ConfigError>),
    #[error("the mocker engine must be started inside a tokio runtime")]
    NoRuntime,
}

fn join(errors: &[ConfigError]) -> String {
    let parts: Vec<String> = errors.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

/// A running mocker worker. Dropping it stops the step loop.
pub struct MockerEngine {
    config: MockerConfig,
    limits: RequestLimits,
    control: mpsc::UnboundedSender<Control>,
    events: broadcast::Sender<KvEvent>,
    stats: Arc<StatsCell>,
    next_id: AtomicU64,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl MockerEngine {
    /// Validates `config` and spawns the step loop on the current tokio runtime.
    pub fn start(config: MockerConfig) -> Result<MockerEngine, EngineError> {
        let scheduler = Scheduler::new(&config).map_err(EngineError::Config)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EngineError::NoRuntime)?;
        let (control, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(config.event_buffer);
        let stats = Arc::new(StatsCell::default());
        stats.store(&scheduler.stats(), 0, 0);
        let stop = CancellationToken::new();
        let step_loop = StepLoop {
            core: scheduler,
            rx,
            events: events.clone(),
            stats: stats.clone(),
            stop: stop.clone(),
            speedup: config.speedup,
            streams: HashMap::new(),
            outputs: Vec::new(),
            kv_events: Vec::new(),
            steps: 0,
            published: 0,
            clock: Instant::now(),
        };
        let task = runtime.spawn(step_loop.run());
        Ok(MockerEngine {
            limits: RequestLimits::new(&config),
            config,
            control,
            events,
            stats,
            next_id: AtomicU64::new(0),
            stop,
            task: Mutex::new(Some(task)),
        })
    }

    pub fn config(&self) -> &MockerConfig {
        &self.config
    }

    /// KV events from now on. A receiver that falls more than `event_buffer` events
    /// behind gets `Lagged` and must resynchronise (the `event_id`s show the gap).
    pub fn subscribe_events(&self) -> broadcast::Receiver<KvEvent> {
        self.events.subscribe()
    }

    /// The latest counters, without waiting for the step loop.
    pub fn stats(&self) -> MockerStats {
        self.stats.load()
    }

    /// Drops the prefix cache; publishes `Cleared`.
    pub fn clear_cache(&self) {
        let _ = self.control.send(Control::ClearCache);
    }

    /// The whole cache as events (`Cleared`, then `Stored` parents first) and the id of
    /// the last event it includes: what a router replays after a gap in `event_id`s or
    /// when it subscribes late.
    pub async fn kv_snapshot(&self) -> Result<KvSnapshot, ServeError> {
        let (tx, rx) = oneshot::channel();
        let stopped = || ServeError::unavailable("the mocker engine is shut down");
        self.control
            .send(Control::Snapshot(tx))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Stops the step loop and waits for it; open streams end with `Unavailable`.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let task = match self.task.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(task) = task {
            if let Err(err) = task.await {
                tracing::error!(%err, "mocker step loop failed");
            }
        }
    }

    fn refuse(&self, error: ServeError) -> ResponseStream<TokenDelta> {
        Box::pin(futures::stream::once(std::future::ready(Err(error))))
    }
}

impl Drop for MockerEngine {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Service<TokenRequest, TokenDelta> for MockerEngine {
    fn call(&self, req: TokenRequest, ctx: RequestContext) -> ResponseStream<TokenDelta> {
        if let Err(err) = self.limits.check(req.token_ids.len(), req.stop.max_tokens) {
            return self.refuse(ServeError::invalid(err.to_string()));
        }
        if ctx.is_cancelled() {
            return self.refuse(ServeError::cancelled());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let seed = req
            .sampling
            .seed
            .unwrap_or_else(|| self.config.seed.wrapping_add(id));
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = ctx.cancellation_token();
        let seq = NewSequence {
            id,
            prompt: req.token_ids,
            max_tokens: req.stop.max_tokens,
            stop_token_ids: req.stop.stop_token_ids,
            ignore_eos: req.stop.ignore_eos,
            seed,
        };
        tracing::debug!(request_id = %ctx.request_id, seq = id, "mocker: request queued");
        let submit = Control::Submit {
            seq,
            tx,
            cancel: cancel.clone(),
        };
        if self.control.send(submit).is_err() {
            return self.refuse(ServeError::unavailable("the mocker engine is shut down"));
        }
        Box::pin(DeltaStream {
            id,
            rx,
            cancelled: Box::pin(cancel.cancelled_owned()),
            control: self.control.clone(),
            done: false,
        })
    }
}

/// Where a request's deltas go, and its cancellation, which the loop checks itself so a
/// cancelled request is dropped even when nobody polls or drops its stream.
struct Caller {
    tx: mpsc::UnboundedSender<DeltaResult>,
    cancel: CancellationToken,
}

/// Every this many steps the loop looks for cancelled requests that are not producing
/// tokens (waiting, or in a long chunked prefill).
const CANCEL_SWEEP_STEPS: u64 = 64;

/// The task that owns the scheduler.
struct StepLoop {
    core: Scheduler,
    rx: mpsc::UnboundedReceiver<Control>,
    events: broadcast::Sender<KvEvent>,
    stats: Arc<StatsCell>,
    stop: CancellationToken,
    speedup: f64,
    streams: HashMap<SeqId, Caller>,
    outputs: Vec<SeqOutput>,
    kv_events: Vec<KvEvent>,
    steps: u64,
    published: u64,
    /// When the last step ended on the model's timeline.
    clock: Instant,
}

/// How late a step may start (timer granularity, scheduling) and still be counted from
/// the end of the previous one, so that the timer's lateness does not add up over steps.
const CATCH_UP: Duration = Duration::from_millis(2);

impl StepLoop {
    /// Where the next step starts on the model's timeline: right after the previous one
    /// when the loop is only a little late, now after an idle spell.
    fn step_start(&self) -> Instant {
        let now = Instant::now();
        if now <= self.clock + CATCH_UP {
            self.clock.min(now)
        } else {
            now
        }
    }

    async fn run(mut self) {
        let instant = self.speedup == f64::INFINITY;
        while !self.stop.is_cancelled() {
            if !self.take_pending() {
                break;
            }
            if self.core.is_idle() {
                self.publish();
                tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => break,
                    msg = self.rx.recv() => match msg {
                        Some(msg) => self.handle(msg),
                        None => break,
                    },
                }
                // Work that arrives after an idle spell starts now, not at the last step's end.
                self.clock = Instant::now();
                continue;
            }

            let started = self.step_start();
            self.outputs.clear();
            if self.steps % CANCEL_SWEEP_STEPS == 0 {
                self.sweep_cancelled();
            }
            let work = self.core.step(&mut self.outputs);
            self.steps += 1;
            self.publish();

            if instant {
                self.send_outputs();
                // Let the consumers (and the rest of the pipeline) run between steps.
                tokio::task::yield_now().await;
                continue;
            }
            let mut duration = step_duration(&work, self.speedup);
            if self.outputs.is_empty() && work.prefill_tokens == 0 && work.decode_seqs == 0 {
                // Nothing could be scheduled: do not spin.
                duration = Duration::from_millis(1);
            }
            self.clock = started + duration;
            if !self.sleep_until(self.clock).await {
                break;
            }
            self.send_outputs();
        }
        self.close_streams();
    }

    /// Handles what has arrived without waiting; false when every sender is gone.
    fn take_pending(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(msg) => self.handle(msg),
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Sleeps while the step "runs", still taking requests and aborts; false on stop.
    async fn sleep_until(&mut self, deadline: Instant) -> bool {
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep_until(deadline) => return true,
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => return false,
                },
            }
        }
    }

    fn handle(&mut self, msg: Control) {
        match msg {
            Control::Submit { seq, tx, cancel } => {
                let id = seq.id;
                match self.core.add(seq) {
                    Ok(()) => {
                        self.streams.insert(id, Caller { tx, cancel });
                    }
                    Err(err) => {
                        let _ = tx.send(Err(ServeError::invalid(err.to_string())));
                    }
                }
            }
            Control::Abort(id) => self.abort(id),
            Control::ClearCache => self.core.clear_cache(),
            Control::Snapshot(reply) => {
                // Publish first, so the snapshot's last event id is one subscribers saw.
                self.publish();
                let _ = reply.send(self.core.kv_snapshot());
            }
        }
    }

    /// Removes a request and frees its blocks, if it is still here.
    fn abort(&mut self, id: SeqId) {
        if self.streams.remove(&id).is_some() {
            self.core.abort(id);
            tracing::debug!(seq = id, "mocker: request aborted, blocks released");
        }
    }

    /// Drops every cancelled request, producing tokens or not.
    fn sweep_cancelled(&mut self) {
        let core = &mut self.core;
        self.streams.retain(|&id, caller| {
            let keep = !caller.cancel.is_cancelled();
            if !keep {
                core.abort(id);
            }
            keep
        });
    }

    /// One delta per sequence that produced a token this step.
    fn send_outputs(&mut self) {
        for out in self.outputs.drain(..) {
            let Some(caller) = self.streams.get(&out.id) else {
                continue; // aborted while the step ran
            };
            // A cancelled caller gets no more tokens; its stream ends itself when polled.
            let gone = caller.cancel.is_cancelled() || {
                let delta = TokenDelta {
                    token_ids: vec![out.token],
                    finish_reason: out.finish,
                    cached_tokens: out.cached_tokens,
                };
                caller.tx.send(Ok(delta)).is_err()
            };
            if gone && out.finish.is_none() {
                // Cancelled, or the stream was dropped: free its blocks now.
                self.core.abort(out.id);
            }
            if gone || out.finish.is_some() {
                self.streams.remove(&out.id);
            }
        }
    }

    fn publish(&mut self) {
        self.core.drain_events(&mut self.kv_events);
        for event in self.kv_events.drain(..) {
            self.published += 1;
            // No subscriber is fine: nobody routes on this worker's cache.
            let _ = self.events.send(event);
        }
        self.stats
            .store(&self.core.stats(), self.steps, self.published);
    }

    fn close_streams(&mut self) {
        for (id, caller) in self.streams.drain() {
            self.core.abort(id);
            let _ = caller
                .tx
                .send(Err(ServeError::unavailable("the mocker engine shut down")));
        }
        self.publish();
    }
}
