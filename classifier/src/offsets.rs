//! Which offsets may be stored: a partition's offset moves past a message only once it and every
//! message before it have their results acknowledged by the broker.

use std::collections::{BTreeMap, HashMap};

/// Messages in flight on one partition, in offset order, with whether each is finished.
#[derive(Default, Debug)]
pub struct PartitionOffsets {
    in_flight: BTreeMap<i64, bool>,
    /// The offset to store (next to read): the first message's until one is finished.
    next: Option<i64>,
}

impl PartitionOffsets {
    /// A message was taken from the partition.
    pub fn start(&mut self, offset: i64) {
        self.next.get_or_insert(offset);
        self.in_flight.insert(offset, false);
    }

    /// The offset stored (or, before anything is, where this owner began): where the partition
    /// stands once nothing is unfinished.
    pub fn next(&self) -> Option<i64> {
        self.next
    }

    /// A message's result is acknowledged; returns the offset to store (next to read), if it moved.
    pub fn finish(&mut self, offset: i64) -> Option<i64> {
        if let Some(done) = self.in_flight.get_mut(&offset) {
            *done = true;
        }
        let mut next = None;
        while let Some(entry) = self.in_flight.first_entry() {
            if !*entry.get() {
                break;
            }
            next = Some(entry.key() + 1);
            entry.remove();
        }
        if next.is_some() {
            self.next = next;
        }
        next
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Messages taken and not yet finished (finished ones wait here for those before them).
    pub fn unfinished(&self) -> usize {
        self.in_flight.values().filter(|done| !**done).count()
    }

    /// Forgets a message that will not be finished here (it was never handed to the pipeline);
    /// the stored offset never moves past it.
    pub fn forget(&mut self, offset: i64) {
        if self.in_flight.get(&offset) == Some(&false) {
            self.in_flight.remove(&offset);
        }
    }
}

/// Offsets for every assigned partition of one topic.
#[derive(Default, Debug)]
pub struct OffsetTracker {
    partitions: HashMap<i32, PartitionOffsets>,
}

impl OffsetTracker {
    pub fn start(&mut self, partition: i32, offset: i64) {
        self.partitions.entry(partition).or_default().start(offset);
    }

    pub fn finish(&mut self, partition: i32, offset: i64) -> Option<i64> {
        self.partitions.get_mut(&partition)?.finish(offset)
    }

    /// Forgets one message of a partition (see [`PartitionOffsets::forget`]).
    pub fn forget(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.forget(offset);
        }
    }

    /// Messages in flight on `partition`.
    pub fn in_flight_on(&self, partition: i32) -> usize {
        self.partitions.get(&partition).map_or(0, PartitionOffsets::in_flight)
    }

    /// Where each partition stands (see [`PartitionOffsets::next`]).
    pub fn next_offsets(&self) -> Vec<(i32, i64)> {
        self.partitions.iter().filter_map(|(p, offsets)| Some((*p, offsets.next()?))).collect()
    }

    /// Forgets a partition that was revoked.
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(PartitionOffsets::in_flight).sum()
    }

    /// Messages taken and not yet finished, on every partition.
    pub fn unfinished(&self) -> usize {
        self.partitions.values().map(PartitionOffsets::unfinished).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_move_only_past_contiguous_finished_messages() {
        let mut p = PartitionOffsets::default();
        for o in 10..15 {
            p.start(o);
        }
        assert_eq!(p.finish(12), None);
        assert_eq!((p.in_flight(), p.unfinished()), (5, 4), "12 is done but waits for 10 and 11");
        assert_eq!(p.finish(11), None);
        assert_eq!(p.finish(10), Some(13));
        assert_eq!(p.finish(14), None);
        assert_eq!(p.finish(13), Some(15));
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn a_forgotten_tail_is_never_passed() {
        let mut t = OffsetTracker::default();
        for o in 10..14 {
            t.start(0, o);
        }
        // 12 and 13 were never handed to the pipeline when the partition was revoked.
        t.forget(0, 12);
        t.forget(0, 13);
        assert_eq!(t.in_flight_on(0), 2);
        assert_eq!(t.finish(0, 11), None);
        assert_eq!(t.finish(0, 10), Some(12), "the next owner starts at the first forgotten one");
        assert_eq!(t.in_flight_on(0), 0);
    }

    #[test]
    fn partitions_are_independent_and_revocation_forgets() {
        let mut t = OffsetTracker::default();
        t.start(0, 5);
        t.start(1, 7);
        assert_eq!(t.finish(1, 7), Some(8));
        assert_eq!(t.in_flight(), 1);
        t.revoke(0);
        assert_eq!(t.finish(0, 5), None);
        assert_eq!(t.in_flight(), 0);
    }
}
