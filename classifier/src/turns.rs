//! Bulk requests taken in turns: each tenant's in turn, and within a tenant each feed's (or
//! submission's), one request at a time. The broker keeps a partition's records in the order they
//! came, so a feed started beside another would otherwise wait for everything of the first one
//! already read; taken in turns, its first images are admitted at the next free place.
//!
//! Ingest shares the broker between feeds the same way (`FEED_WINDOW_IMAGES`, split between
//! tenants, then between a tenant's feeds); this keeps the share once the records are read.

use std::collections::VecDeque;

/// Items waiting in turns by an outer key (a tenant; `None` is the topic's own) and an inner key
/// (a feed or a submission). [`Turns::pop`] takes the oldest item of the next inner key of the
/// next outer key; a key joins the end of the round when its first item comes and leaves it when
/// its last is taken.
pub struct Turns<T> {
    round: VecDeque<Outer<T>>,
    len: usize,
}

struct Outer<T> {
    key: Option<String>,
    round: VecDeque<(String, VecDeque<T>)>,
}

impl<T> Default for Turns<T> {
    fn default() -> Self {
        Self { round: VecDeque::new(), len: 0 }
    }
}

impl<T> Turns<T> {
    /// Items waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `item` behind the others of its keys. Keys are found by a scan: a round holds as
    /// many keys as there are tenants and feeds at work, a few, and at most the items waiting.
    pub fn push(&mut self, outer: Option<&str>, inner: &str, item: T) {
        self.len += 1;
        let at = match self.round.iter().position(|o| o.key.as_deref() == outer) {
            Some(at) => at,
            None => {
                self.round.push_back(Outer { key: outer.map(str::to_owned), round: VecDeque::new() });
                self.round.len() - 1
            }
        };
        let round = &mut self.round[at].round;
        match round.iter_mut().find(|(key, _)| key == inner) {
            Some((_, items)) => items.push_back(item),
            None => round.push_back((inner.to_owned(), VecDeque::from([item]))),
        }
    }

    /// The next item in turn.
    pub fn pop(&mut self) -> Option<T> {
        let mut outer = self.round.pop_front()?;
        let (key, mut items) = outer.round.pop_front()?;
        let item = items.pop_front();
        if !items.is_empty() {
            outer.round.push_back((key, items));
        }
        if !outer.round.is_empty() {
            self.round.push_back(outer);
        }
        self.len -= 1;
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(turns: &mut Turns<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| turns.pop()).collect()
    }

    #[test]
    fn one_key_is_first_in_first_out() {
        let mut turns = Turns::default();
        for item in ["a1", "a2", "a3"] {
            turns.push(None, "feed-a", item);
        }
        assert_eq!(turns.len(), 3);
        assert_eq!(drain(&mut turns), ["a1", "a2", "a3"]);
        assert!(turns.is_empty());
    }

    #[test]
    fn a_feed_arriving_behind_another_is_taken_next() {
        let mut turns = Turns::default();
        for item in ["a1", "a2", "a3", "a4"] {
            turns.push(Some("reef"), "feed-a", item);
        }
        turns.push(Some("kelp"), "feed-b", "b1");
        turns.push(Some("kelp"), "feed-b", "b2");
        assert_eq!(drain(&mut turns), ["a1", "b1", "a2", "b2", "a3", "a4"]);
    }

    #[test]
    fn tenants_take_turns_before_their_feeds_do() {
        let mut turns = Turns::default();
        // reef has two feeds, kelp one: kelp gets half the turns, each of reef's a quarter.
        for i in 0..4 {
            turns.push(Some("reef"), "feed-a", ["a1", "a2", "a3", "a4"][i]);
            turns.push(Some("reef"), "feed-b", ["b1", "b2", "b3", "b4"][i]);
            turns.push(Some("kelp"), "feed-c", ["c1", "c2", "c3", "c4"][i]);
        }
        assert_eq!(drain(&mut turns)[..8], ["a1", "c1", "b1", "c2", "a2", "c3", "b2", "c4"]);
    }

    #[test]
    fn an_emptied_key_leaves_the_round_and_rejoins_at_its_end() {
        let mut turns = Turns::default();
        turns.push(None, "a", "a1");
        turns.push(None, "b", "b1");
        turns.push(None, "b", "b2");
        assert_eq!(turns.pop(), Some("a1"));
        turns.push(None, "a", "a2");
        assert_eq!(drain(&mut turns), ["b1", "a2", "b2"]);
    }
}
