//! Batches written byte by byte with `rmp` (not the decoder's library) in both of vLLM's
//! encodings, decoded and translated.

use dynamo_protocol::{block_hashes, KvEventData, StoredBlock};

use super::translate::Translator;
use super::wire::{decode_batch, sequence, EngineHash, WireEvent};

fn put_str(buf: &mut Vec<u8>, s: &str) {
    rmp::encode::write_str(buf, s).expect("vec write");
}

fn put_hashes(buf: &mut Vec<u8>, hashes: &[u8]) {
    rmp::encode::write_array_len(buf, hashes.len() as u32).expect("vec write");
    for h in hashes {
        rmp::encode::write_bin(buf, &[0xab, *h]).expect("vec write");
    }
}

fn put_tokens(buf: &mut Vec<u8>, tokens: &[u32]) {
    rmp::encode::write_array_len(buf, tokens.len() as u32).expect("vec write");
    for t in tokens {
        rmp::encode::write_uint(buf, u64::from(*t)).expect("vec write");
    }
}

/// vLLM 0.33: `[ts, [ {type: BlockStored, …}, … ], dp_rank]`.
fn stored_map(buf: &mut Vec<u8>, hashes: &[u8], parent: Option<u8>, tokens: &[u32], bs: u32) {
    rmp::encode::write_map_len(buf, 8).expect("vec write");
    put_str(buf, "type");
    put_str(buf, "BlockStored");
    put_str(buf, "block_hashes");
    put_hashes(buf, hashes);
    put_str(buf, "parent_block_hash");
    match parent {
        Some(p) => rmp::encode::write_bin(buf, &[0xab, p]).expect("vec write"),
        None => rmp::encode::write_nil(buf).expect("vec write"),
    }
    put_str(buf, "token_ids");
    put_tokens(buf, tokens);
    put_str(buf, "block_size");
    rmp::encode::write_uint(buf, u64::from(bs)).expect("vec write");
    put_str(buf, "lora_id");
    rmp::encode::write_nil(buf).expect("vec write");
    put_str(buf, "medium");
    put_str(buf, "GPU");
    put_str(buf, "lora_name");
    rmp::encode::write_nil(buf).expect("vec write");
}

fn batch_of(events: impl FnOnce(&mut Vec<u8>) -> u32) -> Vec<u8> {
    let mut body = Vec::new();
    let n = events(&mut body);
    let mut buf = Vec::new();
    rmp::encode::write_array_len(&mut buf, 3).expect("vec write");
    rmp::encode::write_f64(&mut buf, 1.5).expect("vec write");
    rmp::encode::write_array_len(&mut buf, n).expect("vec write");
    buf.extend_from_slice(&body);
    rmp::encode::write_uint(&mut buf, 0).expect("vec write");
    buf
}

#[test]
fn map_encoded_batch_decodes() {
    let tokens: Vec<u32> = (100..132).collect();
    let bytes = batch_of(|b| {
        stored_map(b, &[1, 2], None, &tokens, 16);
        rmp::encode::write_map_len(b, 3).expect("vec write");
        put_str(b, "type");
        put_str(b, "BlockRemoved");
        put_str(b, "block_hashes");
        put_hashes(b, &[2]);
        put_str(b, "medium");
        put_str(b, "GPU");
        rmp::encode::write_map_len(b, 1).expect("vec write");
        put_str(b, "type");
        put_str(b, "AllBlocksCleared");
        3
    });
    let batch = decode_batch(&bytes).expect("decodes");
    assert_eq!(batch.ts, 1.5);
    assert_eq!(batch.data_parallel_rank, Some(0));
    assert_eq!(batch.events.len(), 3);
    match &batch.events[0] {
        WireEvent::BlockStored {
            block_hashes,
            parent,
            token_ids,
            block_size,
            medium,
        } => {
            assert_eq!(block_hashes[1], EngineHash::Bytes(vec![0xab, 2]));
            assert_eq!(*parent, None);
            assert_eq!(token_ids, &tokens);
            assert_eq!(*block_size, 16);
            assert_eq!(medium.as_deref(), Some("GPU"));
        }
        other => panic!("not stored: {other:?}"),
    }
    assert!(matches!(batch.events[2], WireEvent::AllBlocksCleared));
}

#[test]
fn array_like_events_of_older_releases_decode() {
    let bytes = batch_of(|b| {
        rmp::encode::write_array_len(b, 7).expect("vec write");
        put_str(b, "BlockStored");
        rmp::encode::write_array_len(b, 1).expect("vec write");
        rmp::encode::write_sint(b, -7).expect("vec write");
        rmp::encode::write_nil(b).expect("vec write");
        put_tokens(b, &[1, 2, 3, 4]);
        rmp::encode::write_uint(b, 4).expect("vec write");
        rmp::encode::write_nil(b).expect("vec write");
        rmp::encode::write_nil(b).expect("vec write");
        1
    });
    let batch = decode_batch(&bytes).expect("decodes");
    assert!(matches!(
        &batch.events[0],
        WireEvent::BlockStored { block_hashes, block_size: 4, medium: None, .. }
            if block_hashes == &[EngineHash::Int(-7)]
    ));
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    assert!(decode_batch(&[0xc1]).is_err());
    assert!(decode_batch(&[0x90]).is_err(), "an empty array has no ts");
    assert!(sequence(&[1, 2, 3]).is_err());
    assert_eq!(sequence(&7i64.to_be_bytes()), Ok(7));
}

#[test]
fn translated_hashes_equal_the_routers_for_the_same_prompt() {
    let tokens: Vec<u32> = (0..48).collect();
    let expected = block_hashes(&tokens, 16, 9);
    let mut t = Translator::new(16, 9);
    // The engine stores the first two blocks, then the third as their child.
    let first = decode_batch(&batch_of(|b| {
        stored_map(b, &[1, 2], None, &tokens[..32], 16);
        1
    }))
    .expect("decodes");
    let second = decode_batch(&batch_of(|b| {
        stored_map(b, &[3], Some(2), &tokens[32..], 16);
        1
    }))
    .expect("decodes");
    let a = t.batch(0, &first);
    let b = t.batch(1, &second);
    assert_eq!(
        a,
        vec![KvEventData::Stored {
            parent: None,
            blocks: vec![
                StoredBlock { hash: expected[0] },
                StoredBlock { hash: expected[1] }
            ],
        }]
    );
    assert_eq!(
        b,
        vec![KvEventData::Stored {
            parent: Some(expected[1]),
            blocks: vec![StoredBlock { hash: expected[2] }],
        }]
    );
    assert_eq!(t.batch(1, &second), vec![], "a replayed batch is ignored");
    // The snapshot rebuilds the same blocks, parents first.
    let snap = t.snapshot();
    assert_eq!(snap.len(), 4);
    assert_eq!(snap[0], KvEventData::Cleared);
}

#[test]
fn removals_name_our_hashes_and_gaps_clear() {
    let tokens: Vec<u32> = (0..32).collect();
    let expected = block_hashes(&tokens, 16, 0);
    let mut t = Translator::new(16, 0);
    let stored = decode_batch(&batch_of(|b| {
        stored_map(b, &[1, 2], None, &tokens, 16);
        1
    }))
    .expect("decodes");
    t.batch(5, &stored);
    let removed = decode_batch(&batch_of(|b| {
        rmp::encode::write_map_len(b, 3).expect("vec write");
        put_str(b, "type");
        put_str(b, "BlockRemoved");
        put_str(b, "block_hashes");
        put_hashes(b, &[2, 9]);
        put_str(b, "medium");
        put_str(b, "GPU");
        1
    }))
    .expect("decodes");
    assert_eq!(
        t.batch(6, &removed),
        vec![KvEventData::Removed {
            blocks: vec![expected[1]]
        }],
        "an unknown engine hash (9) is dropped"
    );
    assert_eq!(t.len(), 1);
    // Batch 7 was lost: the worker's blocks are cleared, then batch 8 applies.
    let out = t.batch(8, &stored);
    assert_eq!(out[0], KvEventData::Cleared);
    assert_eq!(out.len(), 2);
    assert_eq!(t.skipped.gaps, 1);
    // A block of another size, or a child of an unknown parent, is skipped and counted.
    let odd = decode_batch(&batch_of(|b| {
        stored_map(b, &[4], None, &tokens[..8], 8);
        stored_map(b, &[5], Some(77), &tokens[..16], 16);
        2
    }))
    .expect("decodes");
    assert!(t.batch(9, &odd).is_empty());
    assert_eq!(t.skipped.block_size, 1);
    assert_eq!(t.skipped.unknown_parent, 1);
}
