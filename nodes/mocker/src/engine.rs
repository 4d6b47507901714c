//! The async shell: one tokio task (the step loop, `step_loop.rs`) owns the scheduler. Requests and
//! aborts reach it over one channel, tokens leave on one channel per request, KV events
//! on a broadcast, counters through atomics. Nothing on the hot path takes a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dynamo_protocol::{BlockHash, KvEvent, KvLayout, TokenDelta, TokenRequest};
use dynamo_runtime::kv_transfer::ShmPeer;
use dynamo_runtime::{telemetry, ErrorKind, RequestContext, ResponseStream, ServeError, Service};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::StepBackend;
use crate::block_manager::{ImportError, KvSnapshot};
use crate::config::{ConfigError, MockerConfig};
use crate::gpu_pool::GpuKv;
use crate::payload::verify_transfer;
use crate::scheduler::{RequestLimits, Scheduler};
use crate::sequence::NewSequence;
use crate::stats::{MockerStats, StatsCell};
use crate::step_loop::StepLoop;
use crate::stream::{Control, DeltaStream, ImportBytes};

/// Why the engine could not start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("invalid mocker settings: {}", join(.0))]
    Config(Vec<ConfigError>),
    #[error("the mocker engine must be started inside a tokio runtime")]
    NoRuntime,
    #[error("cannot start the engine's step thread: {0}")]
    Thread(String),
    #[error("cannot keep the KV cache on a GPU (`device = \"cuda\"`): {0}")]
    Gpu(String),
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
    task: Mutex<Option<Task>>,
    /// A real model computes the steps and holds real KV bytes.
    real_kv: bool,
    /// The export name of the backend's pool when it is in shared memory.
    shared_pool: Option<String>,
    /// The pool on the GPU (`kv_on_gpu`), whose blocks a peer on this machine copies by
    /// CUDA IPC.
    gpu: Option<Arc<GpuKv>>,
}

/// Blocks held for a hand-off from the shared pool; released when dropped.
pub struct PinnedBlocks {
    ids: Vec<crate::block_manager::BlockId>,
    control: mpsc::UnboundedSender<Control>,
}

impl PinnedBlocks {
    /// The pool ids, in the order of the hashes pinned.
    pub fn ids(&self) -> &[crate::block_manager::BlockId] {
        &self.ids
    }
}

impl Drop for PinnedBlocks {
    fn drop(&mut self) {
        // A stopped engine has nothing left to release.
        let _ = self
            .control
            .send(Control::Unpin(std::mem::take(&mut self.ids)));
    }
}

/// Where the step loop runs: a tokio task for the mocker, its own thread for a model
/// whose steps compute for milliseconds.
enum Task {
    Tokio(JoinHandle<()>),
    Thread(std::thread::JoinHandle<()>),
}

impl MockerEngine {
    /// Validates `config` and spawns the step loop on the current tokio runtime.
    pub fn start(config: MockerConfig) -> Result<MockerEngine, EngineError> {
        Self::launch(config, None)
    }

    /// Starts an engine whose steps `backend` computes: the same scheduler, block manager,
    /// KV events and hand-off, with real tokens and real KV bytes. The step loop runs on
    /// its own thread (a step computes for milliseconds), and the timing model is off.
    pub fn start_with_backend(
        mut config: MockerConfig,
        backend: Box<dyn StepBackend>,
    ) -> Result<MockerEngine, EngineError> {
        config.speedup = f64::INFINITY;
        Self::launch(config, Some(backend))
    }

    fn launch(
        config: MockerConfig,
        backend: Option<Box<dyn StepBackend>>,
    ) -> Result<MockerEngine, EngineError> {
        let real_kv = backend.is_some();
        let shared_pool = backend.as_ref().and_then(|b| b.shared_pool());
        let scheduler = Scheduler::new(&config).map_err(EngineError::Config)?;
        let layout = config.layout();
        let block_bytes = usize::try_from(layout.bytes_per_block()).map_err(|_| {
            EngineError::Config(vec![ConfigError::LayoutTooLarge {
                bytes: layout.bytes_per_block(),
                max: crate::config::MAX_BLOCK_BYTES,
            }])
        })?;
        let gpu = match (config.kv_on_gpu, real_kv) {
            (false, _) => None,
            (true, true) => {
                return Err(EngineError::Gpu(
                    "a model's KV cache on a GPU needs a CUDA model backend, which this build does not have".into(),
                ))
            }
            (true, false) => Some(Arc::new(
                GpuKv::open(config.num_blocks, block_bytes)
                    .map_err(|e| EngineError::Gpu(e.to_string()))?,
            )),
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EngineError::NoRuntime)?;
        let (control, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(config.event_buffer);
        let stats = Arc::new(StatsCell::default());
        stats.store(&scheduler.stats(), 0, 0);
        let stop = CancellationToken::new();
        let threaded = backend.is_some();
        let step_loop = StepLoop::new(
            scheduler,
            backend,
            rx,
            events.clone(),
            stats.clone(),
            stop.clone(),
            config.speedup,
        )
        .with_gpu(gpu.clone());
        let task = if threaded {
            let loop_runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|e| EngineError::Thread(e.to_string()))?;
            let thread = std::thread::Builder::new()
                .name("engine-step".into())
                .spawn(move || loop_runtime.block_on(step_loop.run()))
                .map_err(|e| EngineError::Thread(e.to_string()))?;
            drop(runtime);
            Task::Thread(thread)
        } else {
            Task::Tokio(runtime.spawn(step_loop.run()))
        };
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
            real_kv,
            shared_pool,
            gpu,
        })
    }

    pub fn config(&self) -> &MockerConfig {
        &self.config
    }

    /// The shape of this worker's KV blocks (`config.layout()`).
    pub fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    /// The export name of this worker's KV pool when a peer on this machine can map it.
    pub fn shared_pool(&self) -> Option<&str> {
        self.shared_pool.as_deref()
    }

    /// The export name of this worker's KV pool on the GPU (`kv_on_gpu`), which a peer on
    /// this machine opens by CUDA IPC.
    pub fn gpu_pool(&self) -> Option<&str> {
        self.gpu.as_deref().map(GpuKv::name)
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
        payload: Vec<u8>,
        layout: &KvLayout,
    ) -> Result<u32, ServeError> {
        if self.real_kv {
            if *layout != self.layout {
                return Err(ServeError::invalid(format!(
                    "KV layout mismatch: the blocks are {layout:?}, this worker's are {:?}",
                    self.layout
                )));
            }
            if payload.len() != hashes.len() * self.block_bytes {
                return Err(ServeError::invalid(format!(
                    "{} KV bytes for {} blocks of {} bytes",
                    payload.len(),
                    hashes.len(),
                    self.block_bytes
                )));
            }
        } else {
            verify_transfer(&self.layout, self.block_bytes, layout, hashes, &payload)
                .map_err(|e| ServeError::invalid(e.to_string()))?;
        }
        let len = payload.len();
        // A pool on the GPU takes the bytes too (a hand-off over a `tcp` link).
        let bytes = if self.real_kv || self.gpu.is_some() {
            ImportBytes::Inline(payload)
        } else {
            ImportBytes::None
        };
        self.import(parent, hashes, bytes, len).await
    }

    /// Caches blocks a prefill worker on this machine left in its shared pool: `blocks`
    /// (one per hash) are read from `peer`'s mapping straight into this worker's pool.
    /// Errors as [`MockerEngine::import_blocks`]; a worker without a real pool, or with
    /// another layout, refuses with `InvalidRequest`.
    pub async fn import_shared(
        &self,
        parent: Option<BlockHash>,
        hashes: &[BlockHash],
        peer: Arc<ShmPeer>,
        blocks: Vec<u32>,
        layout: &KvLayout,
    ) -> Result<u32, ServeError> {
        let pool = if self.real_kv { "real KV" } else { "mocker" };
        self.check_by_id("shared", self.real_kv, pool, layout, &blocks, hashes)?;
        let bytes = hashes.len() * self.block_bytes;
        self.import(parent, hashes, ImportBytes::Shared { peer, blocks }, bytes)
            .await
    }

    /// Refuses blocks a peer left in its pool (`what`: "shared", "GPU") unless this worker
    /// can take them (`able`, else `pool` says what it has), the layout is this worker's
    /// and there is one block id per hash.
    fn check_by_id(
        &self,
        what: &str,
        able: bool,
        pool: &str,
        layout: &KvLayout,
        blocks: &[u32],
        hashes: &[BlockHash],
    ) -> Result<(), ServeError> {
        if !able || *layout != self.layout {
            return Err(ServeError::invalid(format!(
                "{what} KV blocks of {layout:?} cannot be imported by this worker ({:?}, {pool})",
                self.layout,
            )));
        }
        if blocks.len() != hashes.len() {
            return Err(ServeError::invalid(format!(
                "{} {what} block ids for {} hashes",
                blocks.len(),
                hashes.len()
            )));
        }
        Ok(())
    }

    /// Caches blocks a prefill worker on this machine left in its pool on a GPU: `blocks`
    /// (one per hash) of the pool exported as `pool` are copied device to device into this
    /// worker's GPU pool and checked against their hashes. Errors as
    /// [`MockerEngine::import_blocks`]; a worker without a GPU pool, or with another
    /// layout, refuses with `InvalidRequest`.
    pub async fn import_gpu(
        &self,
        parent: Option<BlockHash>,
        hashes: &[BlockHash],
        pool: String,
        blocks: Vec<u32>,
        layout: &KvLayout,
    ) -> Result<u32, ServeError> {
        let able = self.gpu.is_some();
        let has = if able { "GPU pool" } else { "no GPU pool" };
        self.check_by_id("GPU", able, has, layout, &blocks, hashes)?;
        let bytes = hashes.len() * self.block_bytes;
        self.import(parent, hashes, ImportBytes::Gpu { pool, blocks }, bytes)
            .await
    }

    async fn import(
        &self,
        parent: Option<BlockHash>,
        hashes: &[BlockHash],
        payload: ImportBytes,
        payload_len: usize,
    ) -> Result<u32, ServeError> {
        let count = u32::try_from(hashes.len())
            .map_err(|_| ServeError::invalid("too many blocks in one transfer"))?;
        let (reply, rx) = oneshot::channel();
        let stopped = || ServeError::unavailable("the mocker engine is shut down");
        let import = Control::Import {
            parent,
            hashes: hashes.to_vec(),
            payload,
            reply,
        };
        self.control.send(import).map_err(|_| stopped())?;
        match rx.await.map_err(|_| stopped())? {
            Ok(_) => {
                self.stats
                    .add_received(hashes.len() as u64, payload_len as u64);
                Ok(count)
            }
            Err(err @ ImportError::OutOfBlocks(_)) => {
                Err(ServeError::new(ErrorKind::Overloaded, err.to_string()))
            }
            Err(err) => Err(ServeError::invalid(err.to_string())),
        }
    }

    /// The bytes of the cached blocks `hashes` for a hand-off: read from the model's pool,
    /// or fabricated from the hashes by the mocker ([`crate::payload`]).
    pub async fn export_blocks(&self, hashes: &[BlockHash]) -> Result<Vec<u8>, ServeError> {
        let mut chunks = self.export_chunks(hashes, hashes.len()).await?;
        // One chunk of all the blocks: its buffer, not a copy of it.
        Ok(match chunks.len() {
            1 => chunks.pop().unwrap_or_default(),
            _ => chunks.concat(),
        })
    }

    /// [`MockerEngine::export_blocks`] in buffers of `chunk_blocks` blocks each, read at
    /// once: a hand-off's chunks, each moved into its message without another copy.
    pub async fn export_chunks(
        &self,
        hashes: &[BlockHash],
        chunk_blocks: usize,
    ) -> Result<Vec<Vec<u8>>, ServeError> {
        let chunk_blocks = chunk_blocks.max(1);
        if !self.real_kv {
            return Ok(hashes
                .chunks(chunk_blocks)
                .map(|chunk| crate::payload::fabricate(chunk, self.block_bytes))
                .collect());
        }
        let (reply, rx) = oneshot::channel();
        let stopped = || ServeError::unavailable("the engine is shut down");
        let export = Control::Export {
            hashes: hashes.to_vec(),
            chunk_blocks,
            reply,
        };
        self.control.send(export).map_err(|_| stopped())?;
        rx.await
            .map_err(|_| stopped())?
            .map_err(|e| ServeError::new(ErrorKind::Overloaded, e))
    }

    /// Pins the cached blocks `hashes` (none is evicted or rewritten) until the answer is
    /// dropped; their pool ids are what a peer mapping the shared pool reads.
    pub async fn pin_blocks(&self, hashes: &[BlockHash]) -> Result<PinnedBlocks, ServeError> {
        self.pin(hashes, true).await
    }

    /// Keeps the cached blocks `hashes` from eviction until the answer is dropped, for a
    /// hand-off that exports them chunk by chunk ([`MockerEngine::export_chunks`]) as it
    /// sends them, rather than all at once. The mocker without a model holds nothing: its
    /// bytes are made from the hashes, whatever its cache does meanwhile.
    pub async fn hold_blocks(&self, hashes: &[BlockHash]) -> Result<PinnedBlocks, ServeError> {
        if !self.real_kv {
            return Ok(PinnedBlocks {
                ids: Vec::new(),
                control: self.control.clone(),
            });
        }
        self.pin(hashes, false).await
    }

    async fn pin(&self, hashes: &[BlockHash], share: bool) -> Result<PinnedBlocks, ServeError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || ServeError::unavailable("the engine is shut down");
        let pin = Control::Pin {
            hashes: hashes.to_vec(),
            share,
            reply,
        };
        self.control.send(pin).map_err(|_| stopped())?;
        let ids = rx
            .await
            .map_err(|_| stopped())?
            .map_err(|e| ServeError::new(ErrorKind::Overloaded, e))?;
        Ok(PinnedBlocks {
            ids,
            control: self.control.clone(),
        })
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
        match task {
            Some(Task::Tokio(task)) => {
                if let Err(err) = task.await {
                    tracing::error!(%err, "mocker step loop failed");
                }
            }
            Some(Task::Thread(thread)) => {
                let joined = tokio::task::spawn_blocking(move || thread.join()).await;
                if !matches!(joined, Ok(Ok(()))) {
                    tracing::error!("the engine's step thread failed");
                }
            }
            None => {}
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
            sampling: req.sampling,
        };
        tracing::debug!(request_id = %ctx.request_id, seq = id, "mocker: request queued");
        let span = tracing::info_span!(
            "engine",
            request_id = %ctx.request_id,
            seq = id,
            prompt_tokens = seq.prompt.len(),
            max_tokens = seq.max_tokens,
            cached_tokens = tracing::field::Empty,
            completion_tokens = tracing::field::Empty,
            ttft_ms = tracing::field::Empty,
            finish_reason = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        telemetry::follow(&span, &ctx);
        let submit = Control::Submit {
            seq,
            tx,
            cancel: cancel.clone(),
        };
        if self.control.send(submit).is_err() {
            return self.refuse(ServeError::unavailable("the mocker engine is shut down"));
        }
        let deltas = DeltaStream {
            id,
            rx,
            cancelled: Box::pin(cancel.cancelled_owned()),
            control: self.control.clone(),
            done: false,
        };
        if span.is_disabled() {
            return Box::pin(deltas);
        }
        Box::pin(Traced::new(deltas, span))
    }
}

/// The engine's response stream with its spans: `engine` for the whole request,
/// `queue_prefill` from submission to the first token (queue wait and prompt
/// computation; the shell cannot see where one ends), then `decode` to the last token.
struct Traced {
    inner: DeltaStream,
    span: tracing::Span,
    phase: tracing::Span,
    started: std::time::Instant,
    first: bool,
    tokens: u64,
}

impl Traced {
    fn new(inner: DeltaStream, span: tracing::Span) -> Self {
        let phase = tracing::info_span!(parent: &span, "queue_prefill", cached_tokens = tracing::field::Empty);
        Traced {
            inner,
            span,
            phase,
            started: std::time::Instant::now(),
            first: true,
            tokens: 0,
        }
    }

    fn on_delta(&mut self, delta: &TokenDelta) {
        self.tokens += delta.token_ids.len() as u64;
        if self.first && !delta.token_ids.is_empty() {
            self.first = false;
            let ttft = self.started.elapsed().as_secs_f64() * 1e3;
            self.span.record("ttft_ms", ttft);
            if let Some(cached) = delta.cached_tokens {
                self.span.record("cached_tokens", cached);
                self.phase.record("cached_tokens", cached);
            }
            self.phase =
                tracing::info_span!(parent: &self.span, "decode", tokens = tracing::field::Empty);
        }
        if let Some(reason) = delta.finish_reason {
            self.span.record("finish_reason", reason.as_openai());
            self.span.record("completion_tokens", self.tokens);
            self.phase.record("tokens", self.tokens.saturating_sub(1));
            self.phase = tracing::Span::none();
        }
    }
}

impl futures::Stream for Traced {
    type Item = Result<TokenDelta, ServeError>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let next = std::pin::Pin::new(&mut this.inner).poll_next(cx);
        match &next {
            std::task::Poll::Ready(Some(Ok(delta))) => this.on_delta(delta),
            std::task::Poll::Ready(Some(Err(e))) => {
                this.span.record("finish_reason", "error");
                this.span.record("otel.status_code", "ERROR");
                tracing::debug!(parent: &this.span, error = %e, "engine error");
            }
            _ => {}
        }
        next
    }
}
