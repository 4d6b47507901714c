use std::collections::{BTreeMap, BTreeSet};

use dynamo_protocol::KvEventData;

use super::*;

fn config(block_size: usize, num_blocks: usize) -> MockerConfig {
    MockerConfig {
        block_size,
        num_blocks,
        eos_probability: 0.0,
        ..MockerConfig::default()
    }
}

fn req(id: SeqId, prompt: Vec<u32>, max_tokens: u32) -> NewSequence {
    NewSequence {
        id,
        prompt,
        max_tokens,
        stop_token_ids: vec![2],
        ignore_eos: false,
        seed: id,
        sampling: Default::default(),
    }
}

/// Steps until idle; returns every sequence's outputs and the work of each step.
fn run(s: &mut Scheduler) -> (BTreeMap<SeqId, Vec<SeqOutput>>, Vec<StepWork>) {
    let mut outputs: BTreeMap<SeqId, Vec<SeqOutput>> = BTreeMap::new();
    let mut works = Vec::new();
    let mut out = Vec::new();
    while !s.is_idle() {
        assert!(works.len() < 100_000, "no progress");
        out.clear();
        works.push(s.step(&mut out));
        for o in &out {
            outputs.entry(o.id).or_default().push(o.clone());
        }
    }
    (outputs, works)
}

fn tokens(outputs: &[SeqOutput]) -> Vec<u32> {
    outputs.iter().map(|o| o.token).collect()
}

fn assert_complete(outputs: &[SeqOutput], max_tokens: usize) {
    assert_eq!(outputs.len(), max_tokens);
    for (i, o) in outputs.iter().enumerate() {
        let last = i + 1 == max_tokens;
        assert_eq!(o.finish, last.then_some(FinishReason::Length), "output {i}");
        assert_eq!(o.cached_tokens.is_some(), i == 0, "output {i}");
    }
}

#[test]
fn a_request_gets_exactly_max_tokens_and_frees_its_blocks() {
    let mut s = Scheduler::new(&config(4, 64)).unwrap();
    s.add(req(1, (10..20).collect(), 7)).unwrap();
    let (outputs, works) = run(&mut s);
    assert_complete(&outputs[&1], 7);
    // One prefill step (which yields the first token), then 6 decode steps.
    assert_eq!(works.len(), 7);
    assert_eq!(works[0].prefill_tokens, 10);
    assert!(works[1..]
        .iter()
        .all(|w| w.decode_seqs == 1 && w.prefill_tokens == 0));
    let st = s.stats();
    assert_eq!(st.blocks.active, 0);
    assert_eq!(st.running + st.waiting, 0);
    assert!(tokens(&outputs[&1]).iter().all(|&t| t > 2 && t < 32_000));
}

#[test]
fn prefix_reuse_reports_cached_tokens_and_skips_compute() {
    let mut s = Scheduler::new(&config(16, 64)).unwrap();
    let prompt: Vec<u32> = (100..164).collect(); // 4 full blocks
    s.add(req(1, prompt.clone(), 3)).unwrap();
    let (first, _) = run(&mut s);
    assert_eq!(first[&1][0].cached_tokens, Some(0));

    let mut longer = prompt.clone();
    longer.extend(500..520);
    s.add(req(2, longer, 3)).unwrap();
    let (second, works) = run(&mut s);
    assert_eq!(second[&2][0].cached_tokens, Some(64));
    assert_eq!(
        works[0].prefill_tokens, 20,
        "only the uncached suffix is computed"
    );

    // The very same prompt: all but the last token come from the cache.
    s.add(req(3, prompt, 3)).unwrap();
    let (third, _) = run(&mut s);
    assert_eq!(third[&3][0].cached_tokens, Some(63));
    let st = s.stats();
    assert_eq!(st.prefix_hit_tokens, 64 + 63);
    assert_eq!(st.prompt_tokens, 64 + 84 + 64);
    assert_eq!(st.blocks.active, 0);
    assert!(st.blocks.cached_inactive > 0);
}

#[test]
fn without_prefix_caching_nothing_is_reused() {
    let mut s = Scheduler::new(&MockerConfig {
        enable_prefix_caching: false,
        ..config(16, 64)
    })
    .unwrap();
    let prompt: Vec<u32> = (100..164).collect();
    for id in 1..=2 {
        s.add(req(id, prompt.clone(), 2)).unwrap();
        let (out, _) = run(&mut s);
        assert_eq!(out[&id][0].cached_tokens, Some(0));
    }
    let mut events = Vec::new();
    s.drain_events(&mut events);
    assert!(events.is_empty());
    assert_eq!(s.stats().blocks.free, 64);
}

#[test]
fn long_prompts_are_prefilled_in_chunks_under_the_budget() {
    let mut s = Scheduler::new(&MockerConfig {
        max_batched_tokens: 32,
        ..config(4, 64)
    })
    .unwrap();
    s.add(req(1, (10..110).collect(), 2)).unwrap();
    let (outputs, works) = run(&mut s);
    let prefill: Vec<usize> = works.iter().map(|w| w.prefill_tokens).collect();
    assert_eq!(prefill, vec![32, 32, 32, 4, 0]);
    assert_complete(&outputs[&1], 2);
}

#[test]
fn batch_size_is_respected_and_the_queue_drains_in_order() {
    let mut s = Scheduler::new(&MockerConfig {
        max_num_seqs: 2,
        ..config(4, 256)
    })
    .unwrap();
    for id in 0..5 {
        s.add(req(id, vec![10 + id as u32; 9], 4)).unwrap();
    }
    let mut out = Vec::new();
    let mut finished = Vec::new();
    while !s.is_idle() {
        out.clear();
        s.step(&mut out);
        assert!(out.len() <= 2, "{} sequences produced a token", out.len());
        assert!(s.stats().running <= 2);
        finished.extend(out.iter().filter(|o| o.finish.is_some()).map(|o| o.id));
    }
    assert_eq!(finished, vec![0, 1, 2, 3, 4]);
}

#[test]
fn preemption_under_a_small_pool_still_completes_every_request_correctly() {
    // Each request may grow to 12 + 40 - 1 = 51 tokens = 13 blocks; three of them do not
    // fit in 20 blocks at once.
    let cfg = MockerConfig {
        enable_prefix_caching: true,
        ..config(4, 20)
    };
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| (i * 100..i * 100 + 12).collect()).collect();
    let mut s = Scheduler::new(&cfg).unwrap();
    for (id, p) in prompts.iter().enumerate() {
        s.add(req(id as SeqId, p.clone(), 40)).unwrap();
    }
    let (outputs, _) = run(&mut s);
    let st = s.stats();
    assert!(st.preemptions > 0, "the pool is too small for all three");
    assert_eq!(st.blocks.active, 0);
    for (id, p) in prompts.iter().enumerate() {
        let id = id as SeqId;
        assert_complete(&outputs[&id], 40);
        // Exactly what the request produces alone: preemption changes timing, not output.
        let mut alone = Scheduler::new(&cfg).unwrap();
        alone.add(req(id, p.clone(), 40)).unwrap();
        let (solo, _) = run(&mut alone);
        assert_eq!(tokens(&outputs[&id]), tokens(&solo[&id]));
    }
}

#[test]
fn the_newest_running_sequence_is_preempted_first() {
    let mut s = Scheduler::new(&config(4, 6)).unwrap();
    // Two requests of 2 prompt blocks each, both admitted in the first step.
    s.add(req(1, (0..8).collect(), 9)).unwrap();
    s.add(req(2, (50..58).collect(), 9)).unwrap();
    let mut out = Vec::new();
    while s.stats().preemptions == 0 {
        assert!(!s.is_idle(), "expected a preemption");
        s.step(&mut out);
    }
    assert_eq!(s.running.iter().map(|q| q.id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(s.waiting.iter().map(|q| q.id).collect::<Vec<_>>(), vec![2]);
    assert!(s.waiting[0].table.is_empty());
}

#[test]
fn requests_that_can_never_fit_are_rejected() {
    let mut s = Scheduler::new(&config(4, 8)).unwrap();
    assert_eq!(
        s.add(req(1, vec![7; 33], 1)),
        Err(AdmitError::TooLong {
            prompt_tokens: 33,
            max_tokens: 1,
            needed_blocks: 9,
            block_size: 4,
            pool_blocks: 8
        })
    );
    // The prompt fits, but not with all the tokens it may generate.
    assert!(matches!(
        s.add(req(2, vec![7; 30], 10)),
        Err(AdmitError::TooLong { .. })
    ));
    assert_eq!(s.add(req(3, vec![], 1)), Err(AdmitError::EmptyPrompt));
    assert_eq!(s.add(req(4, vec![1], 0)), Err(AdmitError::ZeroMaxTokens));
    // Exactly the pool: accepted and served.
    s.add(req(5, vec![7; 30], 3)).unwrap();
    let (outputs, _) = run(&mut s);
    assert_complete(&outputs[&5], 3);
}

#[test]
fn abort_frees_all_blocks_at_once() {
    let mut s = Scheduler::new(&config(4, 64)).unwrap();
    s.add(req(1, (0..30).collect(), 100)).unwrap();
    s.add(req(2, (100..130).collect(), 100)).unwrap();
    let mut out = Vec::new();
    for _ in 0..5 {
        s.step(&mut out);
    }
    assert!(s.stats().blocks.active > 0);
    assert!(s.abort(1));
    assert!(s.abort(2));
    assert!(!s.abort(2), "already gone");
    let st = s.stats();
    assert_eq!((st.blocks.active, st.running, st.waiting), (0, 0, 0));
    assert!(s.is_idle());
}

#[test]
fn stop_tokens_end_a_request_unless_eos_is_ignored() {
    let cfg = MockerConfig {
        eos_probability: 1.0,
        ..config(4, 64)
    };
    let mut s = Scheduler::new(&cfg).unwrap();
    s.add(req(1, vec![5; 6], 10)).unwrap();
    s.add(NewSequence {
        ignore_eos: true,
        ..req(2, vec![5; 6], 10)
    })
    .unwrap();
    let (outputs, _) = run(&mut s);
    assert_eq!(outputs[&1].len(), 1);
    assert_eq!(outputs[&1][0].token, 2);
    assert_eq!(outputs[&1][0].finish, Some(FinishReason::Stop));
    assert_complete(&outputs[&2], 10);
}

/// A busy mixed workload: event ids are consecutive and replaying them gives exactly the
/// blocks the pool has cached; nothing leaks.
#[test]
fn events_replay_to_the_cached_set_under_load() {
    let mut s = Scheduler::new(&MockerConfig {
        max_batched_tokens: 64,
        ..config(4, 40)
    })
    .unwrap();
    let mut replica = BTreeSet::new();
    let mut next_event = 0;
    let mut events = Vec::new();
    let mut out = Vec::new();
    for id in 0..60u64 {
        // Shared system prompts of three kinds, each with its own tail.
        let mut prompt: Vec<u32> = (0..16).map(|i| 1_000 * (id % 3) as u32 + i).collect();
        prompt.extend((0..(id % 7) as u32).map(|i| 50_000 + id as u32 * 10 + i));
        s.add(req(id, prompt, 1 + (id % 11) as u32)).unwrap();
        if id % 9 == 4 {
            s.abort(id - 2);
        }
        for _ in 0..3 {
            s.step(&mut out);
        }
        if id == 30 {
            s.clear_cache();
        }
        s.drain_events(&mut events);
        for e in events.drain(..) {
            assert_eq!(e.event_id, next_event);
            next_event += 1;
            match e.data {
                KvEventData::Stored { blocks, .. } => {
                    for b in blocks {
                        assert!(replica.insert(b.hash));
                    }
                }
                KvEventData::Removed { blocks } => {
                    for h in blocks {
                        assert!(replica.remove(&h));
                    }
                }
                KvEventData::Cleared => replica.clear(),
            }
        }
        assert_eq!(
            replica.iter().copied().collect::<Vec<_>>(),
            s.blocks.cached_hashes()
        );
    }
    run(&mut s);
    let st = s.stats();
    assert_eq!(st.blocks.active, 0);
    assert_eq!(st.blocks.cached_inactive + st.blocks.free, 40);
    assert!(next_event > 10);
    assert!(st.prefix_hit_tokens > 0);
}

/// Random settings and workloads, with aborts: every request that is not aborted gets
/// exactly its tokens, the pool always adds up, and nothing leaks at the end.
#[test]
fn random_workloads_complete_without_leaks() {
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::{RngExt, SeedableRng};

    let mut preempted_somewhere = false;
    for seed in 0..40 {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let cfg = MockerConfig {
            max_num_seqs: rng.random_range(1..8),
            max_batched_tokens: rng.random_range(1..80),
            enable_prefix_caching: rng.random_bool(0.8),
            ..config(rng.random_range(1..6), rng.random_range(20..60))
        };
        let mut s = Scheduler::new(&cfg).unwrap();
        let mut expected = BTreeMap::new();
        let mut got: BTreeMap<SeqId, usize> = BTreeMap::new();
        let mut out = Vec::new();
        for id in 0..30u64 {
            let len = rng.random_range(1..40u32);
            let prompt: Vec<u32> = (0..len).map(|t| 3 + (t + (id as u32 % 3) * 50)).collect();
            let max_tokens = rng.random_range(1..30);
            if s.add(req(id, prompt, max_tokens)).is_ok() {
                expected.insert(id, max_tokens as usize);
            }
            for _ in 0..rng.random_range(0..4) {
                out.clear();
                s.step(&mut out);
                for o in &out {
                    *got.entry(o.id).or_default() += 1;
                }
                let c = s.stats().blocks;
                assert_eq!(c.active + c.cached_inactive + c.free, c.total);
            }
            if rng.random_bool(0.1) {
                let victim = rng.random_range(0..=id);
                if s.abort(victim) {
                    expected.remove(&victim);
                    got.remove(&victim);
                }
            }
        }
        let (rest, _) = run(&mut s);
        for (id, outs) in rest {
            *got.entry(id).or_default() += outs.len();
        }
        got.retain(|id, _| expected.contains_key(id));
        assert_eq!(got, expected, "seed {seed}");
        let st = s.stats();
        assert_eq!(st.blocks.active, 0, "seed {seed}");
        preempted_somewhere |= st.preemptions > 0;
    }
    assert!(
        preempted_somewhere,
        "the workloads should exercise preemption"
    );
}

/// One batch entry as the recorder saw it: id, start, len, sample, table length.
type Seen = (SeqId, usize, usize, bool, usize);

/// Records what it is asked to compute; "samples" the number of positions computed so far.
#[derive(Default)]
struct Recorder {
    steps: Vec<Vec<Seen>>,
    fail: bool,
}

impl StepBackend for Recorder {
    fn forward(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<u32>, BackendError> {
        self.steps.push(
            batch
                .iter()
                .map(|s| (s.id, s.start, s.len, s.sample, s.table.len()))
                .collect(),
        );
        if self.fail {
            return Err(BackendError("boom".into()));
        }
        Ok(batch
            .iter()
            .filter(|s| s.sample)
            .map(|s| 100 + (s.start + s.len) as u32)
            .collect())
    }
    fn block_bytes(&self) -> usize {
        1
    }
    fn export_blocks(&self, _: &[BlockId], _: &mut Vec<u8>) -> Result<(), BackendError> {
        Ok(())
    }
    fn import_blocks(&mut self, _: &[BlockId], _: &[&[u8]]) -> Result<(), BackendError> {
        Ok(())
    }
}

#[test]
fn a_backend_computes_each_position_once_and_its_tokens_are_the_outputs() {
    let cfg = MockerConfig {
        max_batched_tokens: 8,
        ..config(4, 64)
    };
    let mut s = Scheduler::new(&cfg).unwrap();
    s.add(req(1, vec![7; 10], 3)).unwrap();
    s.add(req(2, vec![8; 3], 2)).unwrap();
    let mut backend = Recorder::default();
    let mut tokens: BTreeMap<SeqId, Vec<u32>> = BTreeMap::new();
    let mut out = Vec::new();
    while !s.is_idle() {
        out.clear();
        s.step_with(&mut out, &mut backend).unwrap();
        for o in &out {
            tokens.entry(o.id).or_default().push(o.token);
        }
    }
    // Prompt 1 (10 tokens) is chunked under the 8-token budget, then decodes one at a time.
    assert_eq!(backend.steps[0], vec![(1, 0, 8, false, 2)]);
    assert_eq!(backend.steps[1][0], (1, 8, 2, true, 3));
    assert_eq!(tokens[&1], vec![110, 111, 112]);
    assert_eq!(tokens[&2], vec![103, 104]);
    // Every position of every sequence was computed exactly once.
    let mut computed: BTreeMap<SeqId, usize> = BTreeMap::new();
    for step in &backend.steps {
        for &(id, start, len, _, table) in step {
            let seen = computed.entry(id).or_default();
            assert_eq!(*seen, start, "seq {id} skipped or repeated positions");
            *seen += len;
            assert!(table * 4 >= start + len, "seq {id}: table too short");
        }
    }
}

#[test]
fn a_failing_backend_aborts_the_sequences_it_was_given() {
    let mut s = Scheduler::new(&config(4, 16)).unwrap();
    s.add(req(1, vec![7; 6], 3)).unwrap();
    s.add(req(2, vec![8; 6], 3)).unwrap();
    let mut backend = Recorder {
        fail: true,
        ..Recorder::default()
    };
    let mut out = Vec::new();
    let failed = s.step_with(&mut out, &mut backend).unwrap_err();
    assert_eq!(failed.ids, vec![1, 2]);
    assert!(out.is_empty());
    assert!(s.is_idle());
    assert_eq!(s.stats().blocks.active, 0, "blocks were not freed");
}

#[test]
fn a_request_past_the_models_context_is_refused_before_it_is_queued() {
    let cfg = MockerConfig {
        max_model_len: Some(64),
        ..config(16, 64)
    };
    let mut s = Scheduler::new(&cfg).unwrap();
    assert!(
        s.add(req(1, vec![5; 60], 5)).is_ok(),
        "60 + 5 - 1 = 64 positions fit"
    );
    let err = s.add(req(2, vec![5; 60], 6)).unwrap_err();
    assert!(
        matches!(err, AdmitError::ExceedsContext { context: 64, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("context of 64 tokens"), "{err}");
}

#[test]
fn pinned_blocks_are_not_evicted_until_unpinned() {
    // A prefill worker pins a hand-off's blocks while a decode worker copies them out of
    // its shared pool: no import (or prefill) may take them meanwhile.
    let cfg = config(4, 4);
    let mut s = Scheduler::new(&cfg).unwrap();
    let hashes = |first: u32, blocks: u32| {
        let tokens: Vec<u32> = (first..first + 4 * blocks).collect();
        dynamo_protocol::block_hashes(&tokens, 4, cfg.hash_seed)
    };
    let a = hashes(0, 2);
    let b = hashes(100, 4);
    s.import_blocks(None, &a).unwrap();
    let pinned = s.pin_blocks(&a).unwrap();
    assert_eq!(pinned.len(), 2);
    assert!(
        s.import_blocks(None, &b).is_err(),
        "an import evicted pinned blocks"
    );
    assert_eq!(s.pin_blocks(&b), Err(0), "uncached blocks were pinned");
    s.unpin_blocks(&pinned);
    s.import_blocks(None, &b).unwrap();
    assert_eq!(s.pin_blocks(&a), Err(0), "evicted blocks were pinned");
}
