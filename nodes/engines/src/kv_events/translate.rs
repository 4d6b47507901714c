//! An engine's KV events in our terms. The engine names blocks by its own hashes; we
//! recompute ours from the token ids (chained to the parent's, so they equal what the
//! router computes for a prompt) and keep a table engine hash → ours, so later removals
//! can be named. Sequence gaps clear the worker's blocks: what follows rebuilds them.

use std::collections::{BTreeMap, HashMap};

use dynamo_protocol::{block_hash, BlockHash, KvEventData, StoredBlock};

use super::wire::{EngineHash, WireBatch, WireEvent};

/// One of our blocks, known by its engine hash.
#[derive(Debug, Clone, Copy)]
struct Known {
    ours: BlockHash,
    parent: Option<BlockHash>,
    /// Insertion order, so a snapshot lists parents before children.
    order: u64,
}

/// Counts of what could not be translated, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    /// Stored blocks whose parent we never saw (published before we subscribed).
    pub unknown_parent: u64,
    /// Blocks of another block size than the router counts in.
    pub block_size: u64,
    /// Blocks on another medium than the GPU (CPU offload, storage).
    pub medium: u64,
    /// Batches after a sequence gap (each clears the worker's blocks).
    pub gaps: u64,
}

pub struct Translator {
    block_size: usize,
    seed: u64,
    known: HashMap<EngineHash, Known>,
    by_order: BTreeMap<u64, EngineHash>,
    next_order: u64,
    last_seq: Option<i64>,
    pub skipped: Skipped,
}

fn on_gpu(medium: &Option<String>) -> bool {
    medium
        .as_deref()
        .is_none_or(|m| m.eq_ignore_ascii_case("GPU"))
}

impl Translator {
    pub fn new(block_size: usize, seed: u64) -> Self {
        Translator {
            block_size,
            seed,
            known: HashMap::new(),
            by_order: BTreeMap::new(),
            next_order: 0,
            last_seq: None,
            skipped: Skipped::default(),
        }
    }

    /// The sequence number of the last batch taken.
    pub fn last_seq(&self) -> Option<i64> {
        self.last_seq
    }

    /// Our events for one batch with sequence number `seq`. A batch already seen (a
    /// replayed or duplicated one) yields nothing; a gap yields `Cleared` first.
    pub fn batch(&mut self, seq: i64, batch: &WireBatch) -> Vec<KvEventData> {
        let mut out = Vec::new();
        match self.last_seq {
            Some(last) if seq <= last => return out,
            Some(last) if seq != last + 1 => {
                self.skipped.gaps += 1;
                self.clear();
                out.push(KvEventData::Cleared);
            }
            _ => {}
        }
        self.last_seq = Some(seq);
        for ev in &batch.events {
            if let Some(data) = self.event(ev) {
                out.push(data);
            }
        }
        out
    }

    fn clear(&mut self) {
        self.known.clear();
        self.by_order.clear();
    }

    fn event(&mut self, ev: &WireEvent) -> Option<KvEventData> {
        match ev {
            WireEvent::AllBlocksCleared => {
                self.clear();
                Some(KvEventData::Cleared)
            }
            WireEvent::BlockRemoved {
                block_hashes,
                medium,
            } => {
                if !on_gpu(medium) {
                    self.skipped.medium += block_hashes.len() as u64;
                    return None;
                }
                let blocks: Vec<BlockHash> = block_hashes
                    .iter()
                    .filter_map(|h| {
                        let k = self.known.remove(h)?;
                        self.by_order.remove(&k.order);
                        Some(k.ours)
                    })
                    .collect();
                (!blocks.is_empty()).then_some(KvEventData::Removed { blocks })
            }
            WireEvent::BlockStored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                medium,
            } => {
                let n = block_hashes.len() as u64;
                if !on_gpu(medium) {
                    self.skipped.medium += n;
                    return None;
                }
                if *block_size != self.block_size {
                    self.skipped.block_size += n;
                    return None;
                }
                let mut parent_ours = match parent {
                    None => None,
                    Some(p) => match self.known.get(p) {
                        Some(k) => Some(k.ours),
                        None => {
                            self.skipped.unknown_parent += n;
                            return None;
                        }
                    },
                };
                let first_parent = parent_ours;
                let mut blocks = Vec::with_capacity(block_hashes.len());
                for (h, tokens) in block_hashes
                    .iter()
                    .zip(token_ids.chunks_exact(self.block_size))
                {
                    let ours = block_hash(parent_ours, tokens, self.seed);
                    let order = self.next_order;
                    self.next_order += 1;
                    if let Some(old) = self.known.insert(
                        h.clone(),
                        Known {
                            ours,
                            parent: parent_ours,
                            order,
                        },
                    ) {
                        self.by_order.remove(&old.order);
                    }
                    self.by_order.insert(order, h.clone());
                    blocks.push(StoredBlock { hash: ours });
                    parent_ours = Some(ours);
                }
                (!blocks.is_empty()).then_some(KvEventData::Stored {
                    parent: first_parent,
                    blocks,
                })
            }
        }
    }

    /// The blocks held now, as events that rebuild them: `Cleared`, then one `Stored` per
    /// block, parents first.
    pub fn snapshot(&self) -> Vec<KvEventData> {
        let mut out = vec![KvEventData::Cleared];
        out.extend(self.by_order.values().filter_map(|h| {
            let k = self.known.get(h)?;
            Some(KvEventData::Stored {
                parent: k.parent,
                blocks: vec![StoredBlock { hash: k.ours }],
            })
        }));
        out
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}
