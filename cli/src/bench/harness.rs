//! The timing harness every section shares: batched calls timed to their median, percentiles,
//! progress on stderr, and running a synchronous section off the async workers.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::Plan;
use super::report::{Figure, section_result};

/// Per-call time of a micro-benchmark: the median over samples.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    pub(super) median_ns: f64,
    pub(super) calls_per_sample: u64,
}

/// Times `f`: finds a batch size that lasts at least `plan.sample_ns`, then times
/// `plan.samples` batches and returns the median per-call time.
pub(super) fn time_calls<R>(plan: &Plan, mut f: impl FnMut() -> R) -> Timing {
    let mut batch = 1u64;
    loop {
        let start = Instant::now();
        for _ in 0..batch {
            black_box(f());
        }
        let ns = start.elapsed().as_nanos() as u64;
        if ns >= plan.sample_ns || batch >= 1 << 32 {
            break;
        }
        // Aim a little past the target so the next round usually ends the search.
        let scaled = batch.saturating_mul(plan.sample_ns + plan.sample_ns / 4) / ns.max(1);
        batch = scaled.clamp(batch * 2, batch * 100);
    }
    let mut per_call: Vec<f64> = (0..plan.samples)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..batch {
                black_box(f());
            }
            start.elapsed().as_nanos() as f64 / batch as f64
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    Timing {
        median_ns: percentile(&per_call, 0.5),
        calls_per_sample: batch,
    }
}

/// Nearest-rank percentile of sorted values (`p` in 0..=1).
pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorted durations in milliseconds.
pub(super) fn sorted_ms(durations: &[Duration]) -> Vec<f64> {
    let mut ms: Vec<f64> = durations.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    ms
}

pub(super) fn progress(what: &str) {
    eprintln!("bench: {what}");
}

/// Runs a synchronous section on the blocking pool, so the runtime's workers stay free.
pub(super) async fn blocking(
    section: &'static str,
    f: impl FnOnce() -> anyhow::Result<Vec<Figure>> + Send + 'static,
) -> Vec<Figure> {
    let result = tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the section panicked: {e}")));
    section_result(section, result)
}

/// The executable `name` in a directory on `PATH`, if there is one.
pub(super) fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }
}
