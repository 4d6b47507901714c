//! Disaggregated serving between two mocker engines in one process: a prefill worker's
//! `PrefillService` hands the prompt's blocks to a decode worker's `KvImportService`
//! through an `InstanceSet`, as the host wires them.

mod fixture;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dynamo_mocker::payload::fabricate;
use dynamo_mocker::{KvImportService, MockerConfig, MockerEngine};
use dynamo_protocol::{
    block_hashes, BlockHash, FinishReason, KvEventData, KvTransfer, KvTransferAck, PrefillResult,
};
use dynamo_runtime::{ErrorKind, RequestContext, Service};
use futures::StreamExt;

use fixture::*;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_fills_the_decode_cache_and_the_decode_request_hits_it() {
    let p = pair(engine(1, 256), engine(2, 256), 4, usize::MAX);
    let mut events = p.decode.subscribe_events();
    let prompt: Vec<u32> = (3..103).collect(); // 6 full blocks of 16, 4 tokens more
    let hashes = block_hashes(&prompt, 16, p.prefill.config().hash_seed);
    assert_eq!(hashes.len(), 6);
    let block_bytes = p.prefill.block_bytes() as u64;
    assert_eq!(block_bytes, 368_640, "SmolLM2-135M's block of 16 tokens");

    let result = run_prefill(&p.service, prefill_request(prompt.clone(), "h1"))
        .await
        .unwrap();
    assert_eq!(
        result,
        PrefillResult {
            prompt_tokens: 100,
            cached_tokens: 0,
            blocks: 6,
            bytes: 6 * block_bytes,
        }
    );
    assert_eq!(*p.seen.lock().unwrap(), vec![(4, false), (2, true)]);

    // The decode cache holds exactly the prompt's full blocks, none of them active.
    let mut expected = hashes.clone();
    expected.sort_unstable();
    assert_eq!(cached(&p.decode).await, expected);
    let d = wait_for(&p.decode, |s| s.blocks_cached == 6).await;
    assert_eq!(d.blocks_active, 0, "{d:?}");
    assert_eq!(
        (d.kv_blocks_received, d.kv_bytes_received),
        (6, 6 * block_bytes)
    );
    assert_eq!((d.kv_blocks_sent, d.kv_bytes_sent), (0, 0));
    let s = wait_for(&p.prefill, |s| s.running == 0 && s.blocks_active == 0).await;
    assert_eq!((s.kv_blocks_sent, s.kv_bytes_sent), (6, 6 * block_bytes));
    assert_eq!(s.kv_blocks_received, 0);

    // The router's view: both chunks announced, chained across the chunk boundary (in
    // either order: the two chunks were in flight together).
    let mut announced = Vec::new();
    while let Ok(event) = events.try_recv() {
        assert_eq!(event.worker_id, 2);
        announced.push(event.data);
    }
    let stored = |parent: Option<BlockHash>, hs: &[BlockHash]| KvEventData::Stored {
        parent,
        blocks: hs
            .iter()
            .map(|&hash| dynamo_protocol::StoredBlock { hash })
            .collect(),
    };
    assert_eq!(announced.len(), 2, "{announced:?}");
    for chunk in [
        stored(None, &hashes[..4]),
        stored(Some(hashes[3]), &hashes[4..]),
    ] {
        assert!(announced.contains(&chunk), "{chunk:?} in {announced:?}");
    }

    // The decode request finds the blocks and prefills only the tail.
    let deltas: Vec<_> = bounded(
        "decode",
        p.decode
            .call(request(prompt.clone(), 5), RequestContext::new("d"))
            .collect::<Vec<_>>(),
    )
    .await;
    let deltas: Vec<_> = deltas.into_iter().map(Result::unwrap).collect();
    assert_eq!(deltas[0].cached_tokens, Some(96));
    assert_eq!(deltas.iter().map(|d| d.token_ids.len()).sum::<usize>(), 5);
    assert_eq!(
        deltas.last().unwrap().finish_reason,
        Some(FinishReason::Length)
    );

    // A second hand-off of the same prompt: the prefill worker's own cache hits, the
    // decode worker refreshes what it has.
    let again = run_prefill(&p.service, prefill_request(prompt, "h2"))
        .await
        .unwrap();
    assert_eq!((again.cached_tokens, again.blocks), (96, 6));
    let d = wait_for(&p.decode, |s| s.kv_blocks_received == 12).await;
    assert_eq!(d.blocks_active, 0);
    assert_eq!(cached(&p.decode).await, expected);
}

#[tokio::test]
async fn a_corrupted_or_misshapen_transfer_is_refused() {
    let decode = engine(2, 64);
    let import = KvImportService::new(decode.clone());
    let hashes = block_hashes(
        &(0..64).collect::<Vec<u32>>(),
        16,
        decode.config().hash_seed,
    );
    let good = KvTransfer {
        handoff_id: "h".into(),
        hashes: hashes.clone(),
        parent: None,
        payload: fabricate(&hashes, decode.block_bytes()),
        layout: decode.kv_layout(),
        last: true,
        shared: None,
        in_place: Vec::new(),
    };
    let call = |t: KvTransfer| {
        let stream = import.call(t, RequestContext::new("kv"));
        async move {
            let items: Vec<_> = bounded("import", stream.collect()).await;
            assert_eq!(items.len(), 1);
            items.into_iter().next().unwrap()
        }
    };

    let mut corrupted = good.clone();
    let at = 2 * decode.block_bytes() + 12_345;
    corrupted.payload[at] ^= 0x10;
    let err = call(corrupted).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidRequest, "{err}");
    assert!(err.message.contains("block 2"), "{err}");

    let mut short = good.clone();
    short.payload.pop();
    assert_eq!(
        call(short).await.unwrap_err().kind,
        ErrorKind::InvalidRequest
    );

    let mut other_model = good.clone();
    other_model.layout.layers = 24;
    assert_eq!(
        call(other_model).await.unwrap_err().kind,
        ErrorKind::InvalidRequest
    );

    assert!(
        cached(&decode).await.is_empty(),
        "nothing refused was cached"
    );
    assert_eq!(decode.stats().kv_blocks_received, 0);

    assert_eq!(call(good).await, Ok(KvTransferAck { blocks: 4 }));
    assert_eq!(cached(&decode).await.len(), 4);
}

#[tokio::test]
async fn chunks_imported_out_of_order_chain_by_their_named_parent() {
    let decode = engine(2, 64);
    let import = KvImportService::new(decode.clone());
    let mut events = decode.subscribe_events();
    let prompt: Vec<u32> = (3..103).collect();
    let hashes = block_hashes(&prompt, 16, decode.config().hash_seed);
    let chunk = |range: std::ops::Range<usize>, last: bool| {
        let hs = hashes[range.clone()].to_vec();
        KvTransfer {
            handoff_id: "h".into(),
            parent: range.start.checked_sub(1).map(|p| hashes[p]),
            payload: fabricate(&hs, decode.block_bytes()),
            hashes: hs,
            layout: decode.kv_layout(),
            last,
            shared: None,
            in_place: Vec::new(),
        }
    };
    // The last chunk first, as a pipelined hand-off may deliver it.
    for (t, blocks) in [(chunk(4..6, true), 2), (chunk(0..4, false), 4)] {
        let answer: Vec<_> = bounded(
            "import",
            import.call(t, RequestContext::new("kv")).collect(),
        )
        .await;
        assert_eq!(answer, vec![Ok(KvTransferAck { blocks })]);
    }
    let mut expected = hashes.clone();
    expected.sort_unstable();
    assert_eq!(cached(&decode).await, expected);
    let mut parents = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let KvEventData::Stored { parent, blocks } = event.data {
            parents.push((parent, blocks.first().map(|b| b.hash)));
        }
    }
    assert_eq!(
        parents,
        vec![(Some(hashes[3]), Some(hashes[4])), (None, Some(hashes[0]))],
        "each chunk stored under the parent it named"
    );
    // The decode request finds the whole chain.
    let deltas: Vec<_> = bounded(
        "decode",
        decode
            .call(request(prompt, 2), RequestContext::new("d"))
            .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(deltas[0].as_ref().map(|d| d.cached_tokens), Ok(Some(96)));
}

#[tokio::test]
async fn decode_side_errors_come_back_with_their_kind() {
    let prompt: Vec<u32> = (3..103).collect();

    // A decode pool too small for the prompt's blocks: Overloaded, nothing held.
    let p = pair(engine(1, 256), engine(2, 4), 8, usize::MAX);
    let err = run_prefill(&p.service, prefill_request(prompt.clone(), "h"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Overloaded, "{err}");
    assert!(err.message.contains("decode instance 7"), "{err}");
    let d = wait_for(&p.decode, |s| s.blocks_free == 4).await;
    assert_eq!((d.blocks_active, d.kv_blocks_received), (0, 0));
    assert_eq!(p.prefill.stats().kv_blocks_sent, 0);

    // A decode worker without prefix caching could never find the blocks.
    let no_cache = Arc::new(
        MockerEngine::start(MockerConfig {
            enable_prefix_caching: false,
            ..MockerConfig::instant()
        })
        .unwrap(),
    );
    let p = pair(engine(1, 256), no_cache, 8, usize::MAX);
    let err = run_prefill(&p.service, prefill_request(prompt.clone(), "h"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidRequest, "{err}");

    // The prefill worker's own refusal: an empty prompt.
    let calls = p.calls.load(Ordering::SeqCst);
    let err = run_prefill(&p.service, prefill_request(Vec::new(), "h"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidRequest, "{err}");
    assert_eq!(p.calls.load(Ordering::SeqCst), calls, "nothing sent");

    // A decode instance that is not live.
    let mut req = prefill_request(prompt, "h");
    req.decode_instance = 99;
    let err = run_prefill(&p.service, req).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_cancelled_mid_transfer_sends_no_more_chunks() {
    // Three chunks of 2 blocks; from the second on, none gets an answer. One chunk in
    // flight at a time, then a window of two.
    for window in [1, 2] {
        let p = pair(engine(1, 256), engine(2, 256), 2, 1);
        let p = Pair {
            service: p.service.with_window(window),
            ..p
        };
        let ctx = RequestContext::new("cancel-me");
        let mut stream = p
            .service
            .call(prefill_request((3..103).collect(), "h"), ctx.clone());
        let answer = tokio::spawn(async move { stream.next().await });
        for _ in 0..2_000 {
            if p.calls.load(Ordering::SeqCst) > window {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            p.calls.load(Ordering::SeqCst),
            window + 1,
            "window {window}: the first chunk answered, a window's worth on its way"
        );
        ctx.cancel();
        let answer = bounded("the cancelled prefill", answer).await.unwrap();
        assert_eq!(
            answer.map(|r| r.map_err(|e| e.kind)),
            Some(Err(ErrorKind::Cancelled))
        );
        assert_eq!(
            p.dropped_held.load(Ordering::SeqCst),
            window,
            "window {window}: the pending chunks were dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            p.calls.load(Ordering::SeqCst),
            window + 1,
            "window {window}: no chunk after the cancel"
        );
        let s = wait_for(&p.prefill, |s| s.running == 0 && s.waiting == 0).await;
        assert_eq!(s.blocks_active, 0, "{s:?}");
        assert_eq!(s.kv_blocks_sent, 2, "only the answered chunk counts");
        let d = wait_for(&p.decode, |s| s.kv_blocks_received == 2).await;
        assert_eq!(d.blocks_active, 0, "{d:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_dropped_while_computing_frees_its_blocks_and_sends_nothing() {
    // Real time: 1000 prompt tokens in steps of 64 take a few hundred milliseconds.
    let prefill = Arc::new(
        MockerEngine::start(MockerConfig {
            worker_id: 1,
            max_batched_tokens: 64,
            speedup: 1.0,
            ..MockerConfig::default()
        })
        .unwrap(),
    );
    let p = pair(prefill, engine(2, 256), 8, usize::MAX);
    let mut stream = p.service.call(
        prefill_request((3..1_003).collect(), "h"),
        RequestContext::new("drop-me"),
    );
    // Polled until the engine holds the prefill's blocks (the whole prefill takes ~280 ms).
    let computing = tokio::time::timeout(LIMIT, async {
        loop {
            let s = p.prefill.stats();
            if s.running == 1 && s.blocks_active > 0 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    tokio::select! {
        early = stream.next() => panic!("the prefill cannot be done yet: {early:?}"),
        s = computing => assert!(s.is_ok(), "the prefill never started computing"),
    }
    drop(stream);
    let s = wait_for(&p.prefill, |s| s.running == 0 && s.waiting == 0).await;
    assert_eq!(s.blocks_active, 0, "{s:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(p.calls.load(Ordering::SeqCst), 0, "no chunk was sent");
    assert_eq!(p.decode.stats().blocks_active, 0);
}
