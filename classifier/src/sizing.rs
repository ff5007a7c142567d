//! How many engines a model gets, and how large its batches are.
//!
//! Engines: one per core on a CPU, each session with one intra-op thread (two sessions side by
//! side cost less CPU an image than one session spreading each operator over two threads, and an
//! interactive image finds an engine free sooner); one on a GPU, which runs a batch on all its
//! cores by itself.
//!
//! Batch size: where `MAX_BATCH_SIZE` is 0, the model's own cost is measured at start on the
//! machine at hand, at batch sizes 1, 2, 4, ... up to the first whose run exceeds the latency
//! bound, and the smallest size within 5% of the cheapest cost per image is taken. On a CPU that
//! is usually a small batch (bigger ones spill the caches); on a GPU, a large one.

use std::time::{Duration, Instant};

use crate::engine::Engine;

/// A size whose cost per image is within this of the cheapest counts as cheapest (the smaller
/// batch waits less and holds an interactive image up less).
const TOLERANCE: f64 = 1.05;

/// The largest batch size tried.
const LARGEST: usize = 256;

/// What one batch size cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    pub batch: usize,
    /// The median run of a batch of this size.
    pub run: Duration,
}

impl Cost {
    pub fn per_image(&self) -> Duration {
        self.run / self.batch as u32
    }
}

/// The batch size to use given the sizes measured: the smallest whose cost per image is within
/// [`TOLERANCE`] of the cheapest of those whose run is within `bound` (batch 1 when none is).
pub fn choose(costs: &[Cost], bound: Duration) -> usize {
    let within: Vec<&Cost> = costs.iter().filter(|c| c.run <= bound).collect();
    let Some(cheapest) = within.iter().map(|c| c.per_image()).min() else { return 1 };
    within
        .iter()
        .filter(|c| c.per_image().as_secs_f64() <= cheapest.as_secs_f64() * TOLERANCE)
        .map(|c| c.batch)
        .min()
        .unwrap_or(1)
}

/// Runs `engine` on batches of 1, 2, 4, ... images of `image_len` floats, each size a few times
/// after one run to warm it, until a batch takes longer than `bound` or `most` is reached; the
/// median run of each size.
pub fn measure(engine: &mut dyn Engine, image_len: usize, most: usize, bound: Duration) -> anyhow::Result<Vec<Cost>> {
    // A mid-grey image: the cost of these models does not depend on the pixels.
    let image = vec![0.5f32; image_len];
    let mut costs = Vec::new();
    let mut batch = 1;
    while batch <= most.min(LARGEST) {
        let input: Vec<f32> = image.iter().copied().cycle().take(image_len * batch).collect();
        let mut run = || -> anyhow::Result<Duration> {
            let started = Instant::now();
            engine.infer(&input, batch).map_err(anyhow::Error::msg)?;
            Ok(started.elapsed())
        };
        let first = run()?;
        // Enough runs to take about a tenth of a second, at least three, at most fifteen.
        let reps = (Duration::from_millis(100).as_secs_f64() / first.as_secs_f64().max(1e-6)).clamp(3.0, 15.0) as usize;
        let mut runs = (0..reps).map(|_| run()).collect::<anyhow::Result<Vec<_>>>()?;
        runs.sort();
        let cost = Cost { batch, run: runs[runs.len() / 2] };
        costs.push(cost);
        if cost.run > bound {
            break;
        }
        batch *= 2;
    }
    Ok(costs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(runs_ms: &[(usize, f64)]) -> Vec<Cost> {
        runs_ms.iter().map(|&(batch, ms)| Cost { batch, run: Duration::from_secs_f64(ms / 1000.0) }).collect()
    }

    #[test]
    fn the_cheapest_size_per_image_is_taken() {
        // This machine's Lite0 on one thread: a bigger batch costs more an image.
        let cpu = costs(&[(1, 5.3), (2, 11.0), (4, 23.0), (8, 49.6), (16, 110.0)]);
        assert_eq!(choose(&cpu, Duration::from_millis(50)), 1);
        // A GPU: the cost an image falls with the batch until the device is full.
        let gpu = costs(&[(1, 2.0), (2, 2.1), (4, 2.2), (8, 2.4), (16, 3.0), (32, 5.0), (64, 9.6), (128, 19.0)]);
        // 0.148 ms an image at 128, 0.150 at 64 (within 5%), 0.156 at 32 (not).
        assert_eq!(choose(&gpu, Duration::from_millis(50)), 64);
    }

    #[test]
    fn a_size_nearly_as_cheap_wins_by_being_smaller() {
        let close = costs(&[(1, 6.0), (2, 10.0), (4, 19.6), (8, 38.4)]);
        // 4.8 ms an image at 8, 4.9 at 4 (within 5%), 5.0 at 2 (within 5%): the smallest of those.
        assert_eq!(choose(&close, Duration::from_millis(50)), 2);
    }

    #[test]
    fn sizes_over_the_latency_bound_are_not_taken() {
        let slow = costs(&[(1, 30.0), (2, 50.0), (4, 90.0)]);
        assert_eq!(choose(&slow, Duration::from_millis(60)), 2);
        assert_eq!(choose(&slow, Duration::from_millis(10)), 1, "batch 1 when none fits");
    }

    struct Linear {
        fixed: Duration,
        per_image: Duration,
        seen: Vec<usize>,
    }

    impl Engine for Linear {
        fn infer(&mut self, input: &[f32], batch: usize) -> Result<Vec<Vec<f32>>, crate::engine::EngineError> {
            assert_eq!(input.len(), batch * 3);
            self.seen.push(batch);
            std::thread::sleep(self.fixed + self.per_image * batch as u32);
            Ok(vec![vec![0.0]; batch])
        }
    }

    #[test]
    fn measuring_stops_at_the_first_size_over_the_bound() {
        let mut engine =
            Linear { fixed: Duration::from_millis(8), per_image: Duration::from_millis(2), seen: Vec::new() };
        let costs = measure(&mut engine, 3, 64, Duration::from_millis(20)).unwrap();
        let sizes: Vec<usize> = costs.iter().map(|c| c.batch).collect();
        // 10, 12, 16, 24 ms: 8 is the first over 20 ms.
        assert_eq!(sizes, [1, 2, 4, 8]);
        assert!(costs[3].run >= Duration::from_millis(24));
        assert_eq!(engine.seen.iter().filter(|&&b| b == 16).count(), 0);
        // The fixed cost makes the biggest batch within the bound the cheapest an image.
        assert_eq!(choose(&costs, Duration::from_millis(20)), 4);
        // Never beyond the most allowed.
        let costs = measure(&mut engine, 3, 2, Duration::from_secs(1)).unwrap();
        assert_eq!(costs.iter().map(|c| c.batch).collect::<Vec<_>>(), [1, 2]);
    }
}
