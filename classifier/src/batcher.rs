//! The batching queue: an actor that groups a model's preprocessed images into batches for its
//! engines (threads with a session each, taking batches from one [`EngineQueue`]).
//!
//! Its decisions come from [`BatchPolicy::decide`], a plain function of the queue and the engines'
//! state: a full batch goes at once; when an engine is idle whatever is queued goes at once
//! (no waiting out the delay); when every engine is busy but one more batch may wait, a partial
//! batch waits at most `max_delay` for company. Urgent (interactive) items are queued ahead of the
//! others and go at once in a batch of their own, ahead of any batch waiting for an engine: an
//! interactive image waits for at most the first running batch to end, and its own inference is
//! that of a batch of one.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// When to send a batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    pub max_size: usize,
    pub max_delay: Duration,
    /// The model's engines, taking batches from one queue.
    pub engines: usize,
    /// Items the queue takes from its channel: more than the pipeline's bulk items
    /// (`BULK_IN_FLIGHT`), so that an urgent item never waits in the channel behind bulk ones,
    /// which the queue would have put behind it.
    pub most_queued: usize,
}

/// What the queue should do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send a batch of this many items (the urgent ones, when any are queued).
    Dispatch(usize),
    /// Wait for more items or the engine, but no later than this.
    WaitUntil(Instant),
    /// Wait for more items or for the engine to finish a batch.
    Wait,
}

impl BatchPolicy {
    /// Batches the engines may hold: one running on each and one waiting, so the next is ready
    /// when one finishes. An urgent batch may go beyond it by one (it goes ahead of the waiting one).
    pub fn engine_depth(&self) -> usize {
        self.engines.max(1) + 1
    }

    /// `queued` items wait, the oldest since `oldest`, the first `urgent` of them urgent;
    /// `in_engine` batches are in the engine.
    pub fn decide(
        &self,
        queued: usize,
        oldest: Option<Instant>,
        urgent: usize,
        in_engine: usize,
        now: Instant,
    ) -> Decision {
        let depth = self.engine_depth();
        if urgent > 0 && in_engine <= depth {
            return Decision::Dispatch(urgent.min(self.max_size));
        }
        if queued == 0 || in_engine >= depth {
            return Decision::Wait;
        }
        if queued >= self.max_size {
            return Decision::Dispatch(self.max_size);
        }
        if in_engine < self.engines.max(1) {
            return Decision::Dispatch(queued);
        }
        let deadline = oldest.unwrap_or(now) + self.max_delay;
        if now >= deadline { Decision::Dispatch(queued) } else { Decision::WaitUntil(deadline) }
    }
}

/// An item waiting in the queue, with when it arrived.
pub struct Queued<T> {
    pub item: T,
    pub since: Instant,
}

/// The batches sent to the engine and not yet taken by it, urgent ones first; the engine thread
/// blocks on it.
pub struct EngineQueue<T> {
    state: Mutex<Waiting<T>>,
    ready: Condvar,
}

struct Waiting<T> {
    /// Urgent batches first (`urgent` of them), then the others, each in the order sent.
    batches: VecDeque<Vec<Queued<T>>>,
    urgent: usize,
    closed: bool,
}

impl<T> Waiting<T> {
    fn pop(&mut self) -> Option<Vec<Queued<T>>> {
        let batch = self.batches.pop_front()?;
        self.urgent = self.urgent.saturating_sub(1);
        Some(batch)
    }
}

impl<T> Default for EngineQueue<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(Waiting { batches: VecDeque::new(), urgent: 0, closed: false }),
            ready: Condvar::new(),
        }
    }
}

impl<T> EngineQueue<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting<T>> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, batch: Vec<Queued<T>>, urgent: bool) {
        let mut state = self.lock();
        if urgent {
            let at = state.urgent;
            state.batches.insert(at, batch);
            state.urgent += 1;
        } else {
            state.batches.push_back(batch);
        }
        self.ready.notify_one();
    }

    /// No more batches will come; the engine ends once it has taken those waiting.
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// The next batch, waiting for one; `None` once closed and empty.
    pub fn take(&self) -> Option<Vec<Queued<T>>> {
        let mut state = self.lock();
        loop {
            if let Some(batch) = state.pop() {
                return Some(batch);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// The next batch if one waits.
    pub fn try_take(&self) -> Option<Vec<Queued<T>>> {
        self.lock().pop()
    }

    /// Batches waiting for the engine.
    pub fn len(&self) -> usize {
        self.lock().batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Closes the engine's queue when the batcher ends, however it ends.
struct CloseOnDrop<'a, T>(&'a EngineQueue<T>);

impl<T> Drop for CloseOnDrop<'_, T> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Runs the queue until `input` closes and everything queued has been sent.
/// `done` receives one message each time the engine finishes a batch; `is_urgent` tells the
/// items that go ahead of the others.
pub async fn run<T: Send>(
    policy: BatchPolicy,
    mut input: mpsc::Receiver<T>,
    engine: std::sync::Arc<EngineQueue<T>>,
    mut done: mpsc::UnboundedReceiver<()>,
    is_urgent: impl Fn(&T) -> bool + Send,
    on_dispatch: impl Fn(usize, Duration) + Send,
) {
    let _close = CloseOnDrop(&engine);
    let mut queue: VecDeque<Queued<T>> = VecDeque::new();
    // The urgent items, all at the front of the queue.
    let mut urgent = 0usize;
    let mut in_engine = 0usize;
    let mut input_open = true;
    loop {
        let now = Instant::now();
        let decision = if input_open {
            policy.decide(queue.len(), queue.front().map(|q| q.since), urgent, in_engine, now)
        } else if queue.is_empty() {
            return;
        } else if in_engine < policy.engine_depth() {
            Decision::Dispatch(queue.len().min(policy.max_size))
        } else {
            Decision::Wait
        };
        let deadline = match decision {
            Decision::Dispatch(n) => {
                let batch: Vec<Queued<T>> = queue.drain(..n).collect();
                let urgent_batch = urgent > 0;
                urgent = urgent.saturating_sub(n);
                on_dispatch(batch.len(), now.duration_since(batch[0].since));
                in_engine += 1;
                engine.push(batch, urgent_batch);
                continue;
            }
            Decision::WaitUntil(at) => Some(at),
            Decision::Wait => None,
        };
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Taking more than this from the channel would only move the queue, not bound it.
            item = input.recv(), if input_open && queue.len() < policy.most_queued => match item {
                Some(item) if is_urgent(&item) => {
                    queue.insert(urgent, Queued { item, since: Instant::now() });
                    urgent += 1;
                }
                Some(item) => queue.push_back(Queued { item, since: Instant::now() }),
                None => input_open = false,
            },
            Some(()) = done.recv() => in_engine = in_engine.saturating_sub(1),
            () = sleep => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const P: BatchPolicy =
        BatchPolicy { max_size: 8, max_delay: Duration::from_millis(10), engines: 1, most_queued: 128 };
    const DEPTH: usize = 2;

    #[test]
    fn nothing_queued_waits() {
        assert_eq!(P.decide(0, None, 0, 0, Instant::now()), Decision::Wait);
    }

    #[test]
    fn a_full_batch_goes_at_once() {
        let now = Instant::now();
        assert_eq!(P.decide(8, Some(now), 0, 1, now), Decision::Dispatch(8));
        assert_eq!(P.decide(20, Some(now), 0, 0, now), Decision::Dispatch(8));
    }

    #[test]
    fn an_idle_engine_gets_whatever_is_queued_without_waiting() {
        let now = Instant::now();
        assert_eq!(P.decide(3, Some(now), 0, 0, now), Decision::Dispatch(3));
    }

    #[test]
    fn a_busy_engine_makes_a_partial_batch_wait_until_its_deadline() {
        let t0 = Instant::now();
        assert_eq!(P.decide(3, Some(t0), 0, 1, t0), Decision::WaitUntil(t0 + P.max_delay));
        assert_eq!(P.decide(3, Some(t0), 0, 1, t0 + P.max_delay), Decision::Dispatch(3));
    }

    #[test]
    fn a_full_engine_takes_nothing_but_an_urgent_batch() {
        let now = Instant::now();
        assert_eq!(P.decide(50, Some(now), 0, DEPTH, now + Duration::from_secs(1)), Decision::Wait);
        assert_eq!(P.decide(50, Some(now), 2, DEPTH, now), Decision::Dispatch(2), "one more, urgent");
        assert_eq!(P.decide(50, Some(now), 2, DEPTH + 1, now), Decision::Wait);
    }

    #[test]
    fn each_engine_gets_a_batch_at_once_and_one_more_waits_for_them() {
        let two = BatchPolicy { engines: 2, ..P };
        let t0 = Instant::now();
        assert_eq!(two.decide(3, Some(t0), 0, 1, t0), Decision::Dispatch(3), "the idle engine takes what there is");
        assert_eq!(two.decide(3, Some(t0), 0, 2, t0), Decision::WaitUntil(t0 + P.max_delay));
        assert_eq!(two.decide(8, Some(t0), 0, 2, t0), Decision::Dispatch(8));
        assert_eq!(two.decide(8, Some(t0), 0, 3, t0), Decision::Wait);
        assert_eq!(two.decide(8, Some(t0), 1, 3, t0), Decision::Dispatch(1), "one more, urgent");
    }

    #[test]
    fn urgent_items_go_alone_and_at_once() {
        let t0 = Instant::now();
        assert_eq!(P.decide(30, Some(t0), 3, 1, t0), Decision::Dispatch(3), "without the bulk items behind them");
        assert_eq!(P.decide(30, Some(t0), 20, 1, t0), Decision::Dispatch(8), "at most a batch");
    }

    /// Lets the actor run until it waits (on a current-thread runtime it runs only while this task yields).
    async fn settle() {
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
    }

    fn items(batch: Vec<Queued<i32>>) -> Vec<i32> {
        batch.into_iter().map(|q| q.item).collect()
    }

    #[tokio::test]
    async fn the_actor_sends_everything_and_respects_batch_size() {
        let (in_tx, in_rx) = mpsc::channel(64);
        let engine = Arc::new(EngineQueue::default());
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        for i in 0..20 {
            in_tx.send(i).await.unwrap();
        }
        drop(in_tx);
        let actor = tokio::spawn(run(P, in_rx, engine.clone(), done_rx, |_| false, |_, _| {}));
        let taker = {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while let Some(batch) = engine.take() {
                    assert!(!batch.is_empty() && batch.len() <= 8);
                    seen.extend(items(batch));
                    let _ = done_tx.send(()); // the actor may already have finished
                }
                seen
            })
        };
        actor.await.unwrap();
        assert_eq!(taker.join().unwrap(), (0..20).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_busy_engine_leaves_the_rest_in_the_bounded_channel() {
        let (in_tx, in_rx) = mpsc::channel(200);
        let engine = Arc::new(EngineQueue::default());
        let (_done_tx, done_rx) = mpsc::unbounded_channel();
        for i in 0..200 {
            in_tx.send(i).await.unwrap();
        }
        tokio::spawn(run(P, in_rx, engine.clone(), done_rx, |_| false, |_, _| {}));
        // The engine never finishes a batch here.
        settle().await;
        // The idle engine got the first item at once; the next batch filled while it was busy.
        let sizes = [engine.try_take().unwrap().len(), engine.try_take().unwrap().len()];
        assert_eq!(sizes, [1, 8]);
        assert!(engine.try_take().is_none(), "the engine holds at most two batches");
        assert_eq!(in_tx.max_capacity() - in_tx.capacity(), 200 - 9 - P.most_queued, "the queue holds at most 128");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn urgent_items_go_alone_ahead_of_a_waiting_batch_and_of_bulk_items() {
        let (in_tx, in_rx) = mpsc::channel(64);
        let engine = Arc::new(EngineQueue::default());
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        // Bulk items are numbered from 0, urgent ones from 1000.
        for i in 0..30 {
            in_tx.send(i).await.unwrap();
        }
        tokio::spawn(run(P, in_rx, engine.clone(), done_rx, |i| *i >= 1000, |_, _| {}));
        settle().await;
        // The engine took the first batch (running); the second waits for it.
        assert_eq!(items(engine.try_take().unwrap()), [0]);
        assert_eq!(engine.len(), 1);
        // Two urgent items arrive while 21 bulk items wait and the engine is full: the first goes
        // ahead of the waiting batch at once, the second once the engine has room again.
        in_tx.send(1000).await.unwrap();
        in_tx.send(1001).await.unwrap();
        settle().await;
        assert_eq!(items(engine.try_take().unwrap()), [1000], "alone, ahead of the waiting batch");
        assert_eq!(items(engine.try_take().unwrap()), (1..9).collect::<Vec<_>>());
        assert!(engine.try_take().is_none(), "nothing more until the engine finishes a batch");
        done_tx.send(()).unwrap();
        settle().await;
        assert_eq!(items(engine.try_take().unwrap()), [1001], "ahead of the bulk items queued before it");
        for _ in 0..3 {
            done_tx.send(()).unwrap();
        }
        settle().await;
        assert_eq!(items(engine.try_take().unwrap()), (9..17).collect::<Vec<_>>(), "then the oldest others");
    }
}
