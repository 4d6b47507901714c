//! The step loop: the one task that owns the scheduler. It takes requests and aborts
//! from one channel, runs a step, sleeps as long as the timing model says (never in
//! instant mode), then hands each request the token its step produced.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dynamo_protocol::{KvEvent, TokenDelta};
use dynamo_runtime::ServeError;
use foldhash::fast::RandomState;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::StepBackend;
use crate::block_manager::{BlockId, ImportError};
use crate::gpu_pool::GpuKv;
use crate::scheduler::{Scheduler, SeqOutput};
use crate::sequence::SeqId;
use crate::stats::StatsCell;
use crate::stream::{Control, DeltaResult, ImportBytes};
use crate::timing::step_duration;

/// Where a request's deltas go, and its cancellation, which the loop checks itself so a
/// cancelled request is dropped even when nobody polls or drops its stream.
struct Caller {
    tx: mpsc::UnboundedSender<DeltaResult>,
    cancel: CancellationToken,
}

/// In instant mode, every this many steps the loop looks for cancelled requests whose
/// streams nobody polls (a polled or dropped stream tells the loop itself at once).
const CANCEL_SWEEP_STEPS: u64 = 64;

/// The task that owns the scheduler.
pub(crate) struct StepLoop {
    core: Scheduler,
    /// A real model computing the steps; `None` for the mocker's timing model.
    backend: Option<Box<dyn StepBackend>>,
    rx: mpsc::UnboundedReceiver<Control>,
    events: broadcast::Sender<KvEvent>,
    stats: Arc<StatsCell>,
    stop: CancellationToken,
    speedup: f64,
    streams: HashMap<SeqId, Caller, RandomState>,
    outputs: Vec<SeqOutput>,
    kv_events: Vec<KvEvent>,
    steps: u64,
    published: u64,
    /// When the last step ended on the model's timeline.
    clock: Instant,
    /// The mocker's KV pool on a GPU (`kv_on_gpu`).
    gpu: Option<Arc<GpuKv>>,
}

/// How late a step may start (timer granularity, scheduling) and still be counted from
/// the end of the previous one, so that the timer's lateness does not add up over steps.
const CATCH_UP: Duration = Duration::from_millis(2);

impl StepLoop {
    pub(crate) fn new(
        core: Scheduler,
        backend: Option<Box<dyn StepBackend>>,
        rx: mpsc::UnboundedReceiver<Control>,
        events: broadcast::Sender<KvEvent>,
        stats: Arc<StatsCell>,
        stop: CancellationToken,
        speedup: f64,
    ) -> Self {
        StepLoop {
            core,
            backend,
            rx,
            events,
            stats,
            stop,
            speedup,
            streams: HashMap::default(),
            outputs: Vec::new(),
            kv_events: Vec::new(),
            steps: 0,
            published: 0,
            clock: Instant::now(),
            gpu: None,
        }
    }

    /// Keeps the bytes of handed-off blocks in `gpu` (see [`crate::gpu_pool`]).
    pub(crate) fn with_gpu(mut self, gpu: Option<Arc<GpuKv>>) -> Self {
        self.gpu = gpu;
        self
    }

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

    pub(crate) async fn run(mut self) {
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
            // Timed steps last milliseconds: look every step. Instant steps last microseconds.
            if !instant || self.steps % CANCEL_SWEEP_STEPS == 0 {
                self.sweep_cancelled();
            }
            let work = match self.backend.as_mut() {
                None => self.core.step(&mut self.outputs),
                Some(backend) => match self.core.step_with(&mut self.outputs, backend.as_mut()) {
                    Ok(work) => work,
                    Err(failed) => {
                        tracing::error!(error = %failed.error, seqs = failed.ids.len(), "engine step failed");
                        for id in &failed.ids {
                            if let Some(caller) = self.streams.remove(id) {
                                let _ = caller.tx.send(Err(ServeError::internal(format!(
                                    "the model failed: {}",
                                    failed.error
                                ))));
                            }
                        }
                        failed.work
                    }
                },
            };
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
            Control::Export {
                hashes,
                chunk_blocks,
                reply,
            } => {
                let _ = reply.send(self.export(&hashes, chunk_blocks));
            }
            Control::Pin {
                hashes,
                share,
                reply,
            } => {
                let mut pinned = self.core.pin_blocks(&hashes).map_err(|i| {
                    format!(
                        "block {i} of {} left the cache before its hand-off",
                        hashes.len()
                    )
                });
                // Peers read pinned blocks straight from the shared pool: bring it up to date.
                if let (Ok(ids), Some(backend), true) = (&pinned, self.backend.as_mut(), share) {
                    if let Err(e) = backend.sync_blocks(ids) {
                        self.core.unpin_blocks(ids);
                        pinned = Err(format!("the KV blocks cannot be shared: {}", e.0));
                    }
                }
                // The timing model computed nothing: leave the blocks' bytes in the GPU
                // pool now, where a forward pass would have.
                if let (Ok(ids), Some(gpu), true) = (&pinned, self.gpu.as_ref(), share) {
                    if let Err(e) = gpu.fill(ids, &hashes) {
                        self.core.unpin_blocks(ids);
                        pinned = Err(format!("the KV blocks cannot be shared: {e}"));
                    }
                }
                let _ = reply.send(pinned);
            }
            Control::Unpin(ids) => self.core.unpin_blocks(&ids),
            Control::ClearCache => self.core.clear_cache(),
            Control::Snapshot(reply) => {
                // Publish first, so the snapshot's last event id is one subscribers saw.
                self.publish();
                let _ = reply.send(self.core.kv_snapshot());
            }
            Control::Import {
                parent,
                hashes,
                payload,
                reply,
            } => {
                let mut result = self.core.import_blocks(parent, &hashes);
                let written = match (&result, self.backend.as_mut(), self.gpu.as_ref()) {
                    (Ok(imported), Some(backend), _) => {
                        write_imported(backend.as_mut(), &imported.chain, &payload)
                    }
                    (Ok(imported), None, Some(gpu)) => {
                        write_gpu(gpu, &imported.chain, &hashes, &payload)
                    }
                    _ => Ok(()),
                };
                if let Err(err) = written {
                    // The chain's hashes are cached already, over blocks that do not hold
                    // their KV: drop the cached blocks rather than serve them.
                    tracing::error!(%err, "writing imported KV blocks failed; the prefix cache is cleared");
                    self.core.clear_cache();
                    result = Err(ImportError::Backend(err));
                }
                // Publish at once: the router may send the decode request right after the ack.
                self.publish();
                let _ = reply.send(result);
            }
        }
    }

    /// The bytes of the cached blocks `hashes`, read from the backend's pool: one buffer
    /// per `chunk_blocks` blocks.
    fn export(
        &self,
        hashes: &[dynamo_protocol::BlockHash],
        chunk_blocks: usize,
    ) -> Result<Vec<Vec<u8>>, String> {
        let Some(backend) = self.backend.as_ref() else {
            return Err("the mocker has no KV bytes to export".into());
        };
        let mut blocks = Vec::with_capacity(hashes.len());
        for (i, &hash) in hashes.iter().enumerate() {
            match self.core.block_of(hash) {
                Some(id) => blocks.push(id),
                None => {
                    return Err(format!(
                        "block {i} of {} ({hash:#018x}) left the cache before its hand-off",
                        hashes.len()
                    ))
                }
            }
        }
        let mut chunks = Vec::with_capacity(blocks.len().div_ceil(chunk_blocks.max(1)));
        for ids in blocks.chunks(chunk_blocks.max(1)) {
            let mut out = Vec::with_capacity(ids.len() * backend.block_bytes());
            backend
                .export_blocks(ids, &mut out)
                .map_err(|e| format!("reading the KV blocks failed: {}", e.0))?;
            chunks.push(out);
        }
        Ok(chunks)
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
            let delta = TokenDelta {
                token_ids: vec![out.token],
                finish_reason: out.finish,
                cached_tokens: out.cached_tokens,
                logprobs: out.logprob.into_iter().collect(),
            };
            let gone = caller.tx.send(Ok(delta)).is_err();
            if gone && out.finish.is_none() {
                // The stream was dropped: free its blocks now.
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

/// Writes the bytes of an import into the backend's pool blocks `chain`: one copy, from
/// the message's payload or straight from the peer's mapped pool.
fn write_imported(
    backend: &mut dyn StepBackend,
    chain: &[BlockId],
    payload: &ImportBytes,
) -> Result<(), String> {
    let block_bytes = backend.block_bytes();
    let src: Vec<&[u8]> = match payload {
        ImportBytes::None => return Ok(()),
        ImportBytes::Inline(bytes) => {
            if bytes.len() != chain.len() * block_bytes {
                return Err(format!(
                    "{} bytes do not fill {} blocks of {block_bytes} bytes",
                    bytes.len(),
                    chain.len()
                ));
            }
            bytes.chunks_exact(block_bytes.max(1)).collect()
        }
        ImportBytes::Gpu { .. } => {
            return Err("KV blocks on a GPU cannot be imported into a model's host pool".into())
        }
        ImportBytes::Shared { peer, blocks } => {
            if blocks.len() != chain.len() {
                return Err(format!(
                    "{} shared block ids for {} blocks",
                    blocks.len(),
                    chain.len()
                ));
            }
            peer.blocks(blocks, block_bytes)
                .map_err(|e| e.to_string())?
        }
    };
    backend.import_blocks(chain, &src).map_err(|e| e.0)
}

/// Writes the bytes of an import into the GPU pool's blocks `chain`: copied device to
/// device from the peer's pool, or from the message's payload; every block is checked
/// against its hash either way.
fn write_gpu(
    gpu: &GpuKv,
    chain: &[crate::block_manager::BlockId],
    hashes: &[dynamo_protocol::BlockHash],
    payload: &ImportBytes,
) -> Result<(), String> {
    match payload {
        ImportBytes::Gpu { pool, blocks } => gpu.import(pool, blocks, chain, hashes),
        // Checked against the hashes when it arrived.
        ImportBytes::Inline(bytes) => gpu.write_blocks(chain, bytes),
        ImportBytes::None => Ok(()),
        ImportBytes::Shared { .. } => {
            Err("KV blocks in host shared memory cannot be imported into a GPU pool".into())
        }
    }
}
