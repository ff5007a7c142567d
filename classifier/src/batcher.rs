//! The batching queue: an actor that groups preprocessed images into batches for the engine.
//!
//! Its decisions come from [`BatchPolicy::decide`], a plain function of the queue and the engine's
//! state: a full batch goes at once; when the engine is idle whatever is queued goes at once
//! (no waiting out the delay); when the engine is busy but can take the next batch, a partial
//! batch waits at most `max_delay` for company, unless it holds an urgent (interactive) item.
//! Urgent items are queued ahead of the others, so each goes in the next batch.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// Batches the engine may hold: one running and one waiting, so the next is ready when it finishes.
pub const ENGINE_DEPTH: usize = 2;

/// Batches' worth of items the queue takes from its channel. More than the pipeline's bulk items
/// (`BULK_IN_FLIGHT`, 8 batches by default) so that an urgent item never waits in the channel
/// behind bulk ones, which the queue would have put behind it.
pub const QUEUE_BATCHES: usize = 16;

/// When to send a batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    pub max_size: usize,
    pub max_delay: Duration,
}

/// What the queue should do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send a batch of this many items.
    Dispatch(usize),
    /// Wait for more items or the engine, but no later than this.
    WaitUntil(Instant),
    /// Wait for more items or for the engine to finish a batch.
    Wait,
}

impl BatchPolicy {
    /// `queued` items wait, the oldest since `oldest`, `urgent` of them urgent; `in_engine`
    /// batches are in the engine.
    pub fn decide(
        &self,
        queued: usize,
        oldest: Option<Instant>,
        urgent: bool,
        in_engine: usize,
        now: Instant,
    ) -> Decision {
        if queued == 0 || in_engine >= ENGINE_DEPTH {
            return Decision::Wait;
        }
        if queued >= self.max_size {
            return Decision::Dispatch(self.max_size);
        }
        if in_engine == 0 || urgent {
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

/// Runs the queue until `input` closes and everything queued has been sent.
/// `done` receives one message each time the engine finishes a batch; `is_urgent` tells the
/// items that go ahead of the others.
pub async fn run<T: Send>(
    policy: BatchPolicy,
    mut input: mpsc::Receiver<T>,
    engine: mpsc::Sender<Vec<Queued<T>>>,
    mut done: mpsc::UnboundedReceiver<()>,
    is_urgent: impl Fn(&T) -> bool + Send,
    on_dispatch: impl Fn(usize, Duration) + Send,
) {
    let mut queue: VecDeque<Queued<T>> = VecDeque::new();
    // The urgent items, all at the front of the queue.
    let mut urgent = 0usize;
    let mut in_engine = 0usize;
    let mut input_open = true;
    loop {
        let now = Instant::now();
        let decision = if input_open {
            policy.decide(queue.len(), queue.front().map(|q| q.since), urgent > 0, in_engine, now)
        } else if queue.is_empty() {
            return;
        } else if in_engine < ENGINE_DEPTH {
            Decision::Dispatch(queue.len().min(policy.max_size))
        } else {
            Decision::Wait
        };
        let deadline = match decision {
            Decision::Dispatch(n) => {
                let batch: Vec<Queued<T>> = queue.drain(..n).collect();
                urgent = urgent.saturating_sub(n);
                on_dispatch(batch.len(), now.duration_since(batch[0].since));
                in_engine += 1;
                if engine.send(batch).await.is_err() {
                    return;
                }
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
            item = input.recv(), if input_open && queue.len() < QUEUE_BATCHES * policy.max_size => match item {
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
    use super::*;

    const P: BatchPolicy = BatchPolicy { max_size: 8, max_delay: Duration::from_millis(10) };

    #[test]
    fn nothing_queued_waits() {
        assert_eq!(P.decide(0, None, false, 0, Instant::now()), Decision::Wait);
    }

    #[test]
    fn a_full_batch_goes_at_once() {
        let now = Instant::now();
        assert_eq!(P.decide(8, Some(now), false, 1, now), Decision::Dispatch(8));
        assert_eq!(P.decide(20, Some(now), false, 0, now), Decision::Dispatch(8));
    }

    #[test]
    fn an_idle_engine_gets_whatever_is_queued_without_waiting() {
        let now = Instant::now();
        assert_eq!(P.decide(3, Some(now), false, 0, now), Decision::Dispatch(3));
    }

    #[test]
    fn a_busy_engine_makes_a_partial_batch_wait_until_its_deadline() {
        let t0 = Instant::now();
        assert_eq!(P.decide(3, Some(t0), false, 1, t0), Decision::WaitUntil(t0 + P.max_delay));
        assert_eq!(P.decide(3, Some(t0), false, 1, t0 + P.max_delay), Decision::Dispatch(3));
    }

    #[test]
    fn a_full_engine_takes_nothing() {
        let now = Instant::now();
        assert_eq!(P.decide(50, Some(now), true, ENGINE_DEPTH, now + Duration::from_secs(1)), Decision::Wait);
    }

    #[tokio::test]
    async fn the_actor_sends_everything_and_respects_batch_size() {
        let (in_tx, in_rx) = mpsc::channel(64);
        let (engine_tx, mut engine_rx) = mpsc::channel(ENGINE_DEPTH);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        for i in 0..20 {
            in_tx.send(i).await.unwrap();
        }
        drop(in_tx);
        let actor = tokio::spawn(run(P, in_rx, engine_tx, done_rx, |_| false, |_, _| {}));
        let mut seen = Vec::new();
        while let Some(batch) = engine_rx.recv().await {
            assert!(!batch.is_empty() && batch.len() <= 8);
            seen.extend(batch.into_iter().map(|q| q.item));
            let _ = done_tx.send(()); // the actor may already have finished
        }
        actor.await.unwrap();
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_busy_engine_leaves_the_rest_in_the_bounded_channel() {
        let (in_tx, in_rx) = mpsc::channel(200);
        let (engine_tx, mut engine_rx) = mpsc::channel(ENGINE_DEPTH);
        let (_done_tx, done_rx) = mpsc::unbounded_channel();
        for i in 0..200 {
            in_tx.send(i).await.unwrap();
        }
        tokio::spawn(run(P, in_rx, engine_tx, done_rx, |_| false, |_, _| {}));
        // On a current-thread runtime the actor runs only while this task yields; it ends up
        // waiting on the engine, which never finishes a batch here.
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        // The idle engine got the first item at once; the next batch filled while it was busy.
        let sizes = [engine_rx.try_recv().unwrap().len(), engine_rx.try_recv().unwrap().len()];
        assert_eq!(sizes, [1, 8]);
        assert!(engine_rx.try_recv().is_err(), "the engine holds at most two batches");
        let queued = QUEUE_BATCHES * 8;
        assert_eq!(in_tx.max_capacity() - in_tx.capacity(), 200 - 9 - queued, "the queue holds at most 16 batches");
    }

    #[test]
    fn an_urgent_item_goes_without_waiting_for_company() {
        let t0 = Instant::now();
        assert_eq!(P.decide(3, Some(t0), true, 1, t0), Decision::Dispatch(3));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn urgent_items_go_in_the_next_batch_ahead_of_those_queued_before_them() {
        let (in_tx, in_rx) = mpsc::channel(64);
        let (engine_tx, mut engine_rx) = mpsc::channel(ENGINE_DEPTH);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        // Bulk items are numbered from 0, urgent ones from 1000.
        for i in 0..30 {
            in_tx.send(i).await.unwrap();
        }
        tokio::spawn(run(P, in_rx, engine_tx, done_rx, |i| *i >= 1000, |_, _| {}));
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        let first: Vec<i32> = engine_rx.try_recv().unwrap().into_iter().map(|q| q.item).collect();
        let second: Vec<i32> = engine_rx.try_recv().unwrap().into_iter().map(|q| q.item).collect();
        assert_eq!((first, second), (vec![0], (1..9).collect()));
        // Two urgent items arrive while 21 bulk items wait and the engine is full.
        in_tx.send(1000).await.unwrap();
        in_tx.send(1001).await.unwrap();
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        assert!(engine_rx.try_recv().is_err(), "the engine is full");
        done_tx.send(()).unwrap();
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        let next: Vec<i32> = engine_rx.try_recv().unwrap().into_iter().map(|q| q.item).collect();
        assert_eq!(next, [1000, 1001, 9, 10, 11, 12, 13, 14], "the urgent ones first, then the oldest others");
    }
}
