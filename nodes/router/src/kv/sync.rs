//! Per-worker event-id tracking: whether the next event continues the stream we have, is a
//! restarted worker's first, or shows that we missed something.

use std::collections::VecDeque;

use dynamo_protocol::KvEvent;

/// Events kept per worker while it waits for a snapshot; past this the oldest are
/// dropped, and the snapshot's replay then finds the gap and asks again.
pub(crate) const RESYNC_BUFFER: usize = 16_384;

/// What the indexer did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    /// The next event of the worker's stream: applied.
    Applied,
    /// Event id 0 after others: the worker restarted with an empty cache. Its old blocks
    /// were dropped and the event applied.
    Restarted,
    /// A gap (or a late start): the worker's index may be wrong until a snapshot is
    /// applied with [`crate::kv::KvIndexer::apply_snapshot`]. Reported once per gap.
    NeedsResync,
    /// The worker awaits a snapshot; the event is kept and replayed after it.
    Buffered,
    /// Already covered by the last snapshot (published before it was taken): ignored.
    Stale,
}

/// What the indexer should do with an event, decided from its id alone.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Apply,
    Restart,
    Gap,
    Buffer,
    Stale,
}

#[derive(Debug, Default)]
pub(crate) struct EventSync {
    /// Id of the last event applied (or covered by a snapshot).
    last: Option<u64>,
    /// After a snapshot: ids up to `last` may still be in flight and are skipped, as long
    /// as they keep increasing. Closed by the first event past `last`.
    stale_window: Option<Option<u64>>,
    /// Waiting for a snapshot, with the events that arrived meanwhile.
    resync: Option<VecDeque<KvEvent>>,
}

impl EventSync {
    pub fn needs_resync(&self) -> bool {
        self.resync.is_some()
    }

    /// Classifies `event_id` and advances the tracking as if the verdict is carried out.
    pub fn check(&mut self, event: &KvEvent) -> Verdict {
        let id = event.event_id;
        if let Some(buffer) = self.resync.as_mut() {
            if buffer.len() >= RESYNC_BUFFER {
                buffer.pop_front();
            }
            buffer.push_back(event.clone());
            return Verdict::Buffer;
        }
        let verdict = match (self.last, self.stale_window) {
            (None, _) if id == 0 => Verdict::Apply,
            (Some(last), _) if last.checked_add(1) == Some(id) => Verdict::Apply,
            (Some(_), _) if id == 0 => Verdict::Restart,
            (Some(last), Some(prev)) if id <= last && prev.is_none_or(|p| id > p) => {
                self.stale_window = Some(Some(id));
                return Verdict::Stale;
            }
            _ => Verdict::Gap,
        };
        self.stale_window = None;
        match verdict {
            Verdict::Gap => self.resync = Some(VecDeque::from([event.clone()])),
            _ => self.last = Some(id),
        }
        verdict
    }

    /// A snapshot covering events up to `last` was applied; returns the events that came
    /// in while waiting, for the caller to pass through [`EventSync::check`] again, then
    /// to call [`EventSync::replayed`].
    pub fn snapshot_applied(&mut self, last: Option<u64>) -> Vec<KvEvent> {
        self.last = last;
        self.stale_window = last.map(|_| None);
        self.resync.take().map(Vec::from).unwrap_or_default()
    }

    /// The buffered events were replayed. Whatever they applied may be delivered again
    /// (a fresh subscription starts right after the snapshot), so ids up to the last one
    /// are skipped until the stream moves past it.
    pub fn replayed(&mut self) {
        if self.resync.is_none() && self.last.is_some() {
            self.stale_window = Some(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use dynamo_protocol::KvEventData;

    use super::*;

    fn ev(id: u64) -> KvEvent {
        KvEvent {
            worker_id: 1,
            event_id: id,
            data: KvEventData::Cleared,
        }
    }

    #[test]
    fn consecutive_ids_apply_and_a_gap_buffers_until_the_snapshot() {
        let mut s = EventSync::default();
        assert_eq!(s.check(&ev(0)), Verdict::Apply);
        assert_eq!(s.check(&ev(1)), Verdict::Apply);
        assert_eq!(s.check(&ev(3)), Verdict::Gap);
        assert!(s.needs_resync());
        assert_eq!(s.check(&ev(4)), Verdict::Buffer);
        let kept: Vec<u64> = s
            .snapshot_applied(Some(3))
            .iter()
            .map(|e| e.event_id)
            .collect();
        assert_eq!(kept, vec![3, 4]);
        assert!(!s.needs_resync());
        assert_eq!(s.check(&ev(3)), Verdict::Stale);
        assert_eq!(s.check(&ev(4)), Verdict::Apply);
        s.replayed();
        // A fresh subscription delivers 4 again, then goes on.
        assert_eq!(s.check(&ev(4)), Verdict::Stale);
        assert_eq!(s.check(&ev(5)), Verdict::Apply);
        assert_eq!(s.check(&ev(5)), Verdict::Gap, "the window closed");
    }

    #[test]
    fn late_start_restart_and_duplicates() {
        let mut s = EventSync::default();
        assert_eq!(s.check(&ev(5)), Verdict::Gap, "joined late");
        s.snapshot_applied(Some(5));
        assert_eq!(s.check(&ev(6)), Verdict::Apply);
        assert_eq!(s.check(&ev(0)), Verdict::Restart);
        assert_eq!(s.check(&ev(1)), Verdict::Apply);
        assert_eq!(s.check(&ev(1)), Verdict::Gap, "a repeat is not trusted");
    }

    #[test]
    fn stale_ids_after_a_snapshot_must_increase() {
        let mut s = EventSync::default();
        s.snapshot_applied(Some(10));
        assert_eq!(s.check(&ev(8)), Verdict::Stale);
        assert_eq!(
            s.check(&ev(7)),
            Verdict::Gap,
            "going back is a restart we missed"
        );
    }
}
