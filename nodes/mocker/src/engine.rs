//! The async shell: one tokio task (the step loop, `step_loop.rs`) owns the scheduler. Requests and
//! aborts reach it over one channel, tokens leave on one channel per request, KV events
//! on a broadcast, counters through atomics. Nothing on the hot path takes a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dynamo_protocol::{BlockHash, KvEvent, KvLayout, TokenDelta, TokenRequest};
use dynamo_runtime::{ErrorKind, RequestContext, ResponseStream, ServeError, Service};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::block_manager::{ImportError, KvSnapshot};
use crate::config::{ConfigError, MockerConfig};
use crate::payload::verify_transfer;
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
    layout: KvLayout,
    /// `layout.bytes_per_block()`, bounded by the config's validation.
    block_bytes: usize,
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
        let layout = config.layout();
        let block_bytes = usize::try_from(layout.bytes_per_block()).map_err(|_| {
            EngineError::Config(vec![ConfigError::LayoutTooLarge {
                bytes: layout.bytes_per_block(),
                max: crate::config::MAX_BLOCK_BYTES,
            }])
        })?;
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
            layout,
            block_bytes,
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

    /// The shape of this worker's KV blocks (`config.layout()`).
    pub fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    /// Bytes of one KV block of [`MockerEngine::kv_layout`].
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Caches blocks a prefill worker computed: checks that `layout` is this worker's, that
    /// `payload` holds one block per hash and that every byte is the block's fabrication
    /// ([`crate::payload`]), then stores the chain `hashes` (the first a child of `parent`)
    /// as inactive cached blocks and publishes `Stored` for the new ones. Returns how many
    /// blocks of the chain are now cached.
    ///
    /// Errors: a wrong layout, length or byte is `InvalidRequest`; a pool too full to take
    /// the new blocks (even after evicting every inactive one) is `Overloaded`; a worker
    /// without prefix caching refuses with `InvalidRequest`.
    pub async fn import_blocks(
        &self,
        parent: Option<BlockHash>,
        hashes: &[BlockHash],
        payload: &[u8],
        layout: &KvLayout,
    ) -> Result<u32, ServeError> {
        verify_transfer(&self.layout, self.block_bytes, layout, hashes, payload)
            .map_err(|e| ServeError::invalid(e.to_string()))?;
        let count = u32::try_from(hashes.len())
            .map_err(|_| ServeError::invalid("too many blocks in one transfer"))?;
        let (reply, rx) = oneshot::channel();
        let stopped = || ServeError::unavailable("the mocker engine is shut down");
        let import = Control::Import {
            parent,
            hashes: hashes.to_vec(),
            reply,
        };
        self.control.send(import).map_err(|_| stopped())?;
        match rx.await.map_err(|_| stopped())? {
            Ok(_) => {
                self.stats
                    .add_received(hashes.len() as u64, payload.len() as u64);
                Ok(count)
            }
            Err(err @ ImportError::OutOfBlocks(_)) => {
                Err(ServeError::new(ErrorKind::Overloaded, err.to_string()))
            }
            Err(err) => Err(ServeError::invalid(err.to_string())),
        }
    }

    /// Counts blocks this worker handed to a decode worker.
    pub(crate) fn record_sent(&self, blocks: u64, bytes: u64) {
        self.stats.add_sent(blocks, bytes);
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
