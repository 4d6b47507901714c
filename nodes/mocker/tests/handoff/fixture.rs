//! Two mocker engines wired as the host wires a prefill and a decode worker, with a tap
//! on the decode side that records (and can hold) every chunk.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynamo_mocker::{KvImportService, MockerConfig, MockerEngine, MockerStats, PrefillService};
use dynamo_protocol::{
    BlockHash, KvEventData, KvTransfer, KvTransferAck, PrefillRequest, PrefillResult,
    SamplingOptions, StopConditions, TokenRequest,
};
use dynamo_runtime::{InstanceSet, RequestContext, ResponseStream, ServeError, Service};
use futures::StreamExt;

pub const DECODE: u64 = 7;
pub const LIMIT: Duration = Duration::from_secs(20);

pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} took longer than {LIMIT:?}"),
    }
}

pub fn request(prompt: Vec<u32>, max_tokens: u32) -> TokenRequest {
    TokenRequest {
        model: "mock".into(),
        token_ids: prompt,
        sampling: SamplingOptions::default(),
        stop: StopConditions {
            max_tokens,
            stop_token_ids: vec![2],
            ignore_eos: true,
        },
    }
}

pub fn prefill_request(prompt: Vec<u32>, handoff_id: &str) -> PrefillRequest {
    PrefillRequest {
        request: request(prompt, 50),
        handoff_id: handoff_id.into(),
        decode_instance: DECODE,
    }
}

pub fn engine(worker_id: u64, num_blocks: usize) -> Arc<MockerEngine> {
    Arc::new(
        MockerEngine::start(MockerConfig {
            worker_id,
            num_blocks,
            ..MockerConfig::instant()
        })
        .unwrap(),
    )
}

/// Waits (bounded) until the engine's counters satisfy `cond`.
pub async fn wait_for(engine: &MockerEngine, cond: impl Fn(&MockerStats) -> bool) -> MockerStats {
    for _ in 0..2_000 {
        let s = engine.stats();
        if cond(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition never held: {:?}", engine.stats());
}

/// The decode side as the prefill worker sees it: records each transfer and passes it on,
/// except that calls from number `hold_from` on never answer (a slow decode worker).
pub struct Tap {
    inner: Arc<dyn Service<KvTransfer, KvTransferAck>>,
    seen: Arc<Mutex<Vec<(usize, bool)>>>,
    calls: Arc<AtomicUsize>,
    hold_from: usize,
    dropped_held: Arc<AtomicUsize>,
}

/// Counts, when dropped, a held call that was dropped unanswered.
pub struct DropCount(Arc<AtomicUsize>);
impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Service<KvTransfer, KvTransferAck> for Tap {
    fn call(&self, req: KvTransfer, ctx: RequestContext) -> ResponseStream<KvTransferAck> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut seen) = self.seen.lock() {
            seen.push((req.hashes.len(), req.last));
        }
        if n < self.hold_from {
            return self.inner.call(req, ctx);
        }
        let guard = DropCount(self.dropped_held.clone());
        Box::pin(futures::stream::once(async move {
            let _guard = guard;
            std::future::pending::<Result<KvTransferAck, ServeError>>().await
        }))
    }
}

pub struct Pair {
    pub prefill: Arc<MockerEngine>,
    pub decode: Arc<MockerEngine>,
    pub service: PrefillService,
    /// (blocks, last) of every transfer, in order.
    pub seen: Arc<Mutex<Vec<(usize, bool)>>>,
    pub calls: Arc<AtomicUsize>,
    /// Held calls dropped unanswered.
    pub dropped_held: Arc<AtomicUsize>,
}

pub fn pair(
    prefill: Arc<MockerEngine>,
    decode: Arc<MockerEngine>,
    chunk: usize,
    hold_from: usize,
) -> Pair {
    let kv = Arc::new(InstanceSet::<KvTransfer, KvTransferAck>::new("prefill.kv"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let dropped_held = Arc::new(AtomicUsize::new(0));
    kv.add(
        DECODE,
        Arc::new(Tap {
            inner: Arc::new(KvImportService::new(decode.clone())),
            seen: seen.clone(),
            calls: calls.clone(),
            hold_from,
            dropped_held: dropped_held.clone(),
        }),
    );
    let service = PrefillService::new(prefill.clone(), kv).with_chunk_blocks(chunk);
    Pair {
        prefill,
        decode,
        service,
        seen,
        calls,
        dropped_held,
    }
}

pub async fn run_prefill(
    service: &PrefillService,
    req: PrefillRequest,
) -> Result<PrefillResult, ServeError> {
    let items: Vec<_> = bounded(
        "prefill",
        service.call(req, RequestContext::new("p")).collect(),
    )
    .await;
    assert_eq!(items.len(), 1, "one answer per prefill: {items:?}");
    items.into_iter().next().unwrap()
}

/// Hashes of the blocks a snapshot says are cached, sorted.
pub async fn cached(engine: &MockerEngine) -> Vec<BlockHash> {
    let snapshot = bounded("snapshot", engine.kv_snapshot()).await.unwrap();
    let mut hashes: Vec<BlockHash> = snapshot
        .events
        .iter()
        .flat_map(|e| match e {
            KvEventData::Stored { blocks, .. } => blocks.iter().map(|b| b.hash).collect(),
            _ => Vec::new(),
        })
        .collect();
    hashes.sort_unstable();
    hashes
}
