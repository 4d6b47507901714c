//! The async shell: one tokio task (the step loop, `step_loop.rs`) owns the scheduler. Requests and
//! aborts reach it over one channel, tokens leave on one channel per request, KV events
//! on a broadcast, counters through atomics. Nothing on the hot path takes a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dynamo_protocol::{KvEvent, TokenDelta, TokenRequest};
use dynamo_runtime::{RequestContext, ResponseStream, ServeError, Service};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::block_manager::KvSnapshot;
use crate::config::{ConfigError, MockerConfig};
use crate::scheduler::{RequestLimits, Scheduler};
use crate::sequence::NewSequence;
use crate::stats::{MockerStats, StatsCell};
use crate::step_loop::StepLoop;
use crate::stream::{Control, DeltaStream};

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
        let step_loop = StepLoop::new(
            scheduler,
            rx,
            events.clone(),
            stats.clone(),
            stop.clone(),
            config.speedup,
        );
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
