//! The health score: `0.4·bandwidth + 0.3·latency + 0.2·compute + 0.1·reputation`.

use serde::{Deserialize, Serialize};

use crate::TelemetrySample;

/// Fixed-point scale of the score and of every term: `SCORE_SCALE` means 1.0.
pub const SCORE_SCALE: u32 = 10_000;

/// Reference points that map raw readings onto [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoreConfig {
    /// Bandwidth at which the bandwidth term saturates at 1.0, in kbit/s. Default 100,000 (100 Mbit/s).
    pub bandwidth_ref_kbps: u32,
    /// Latency at which the latency term falls to 0, in µs; use the safety policy's maximum.
    /// Default 100,000 (100 ms).
    pub latency_max_us: u32,
    /// Core count at which capacity saturates at 1.0. Default 8.
    pub cores_ref: u16,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        Self {
            bandwidth_ref_kbps: 100_000,
            latency_max_us: 100_000,
            cores_ref: 8,
        }
    }
}

/// The four normalised terms and the weighted score, each in `0..=SCORE_SCALE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HealthTerms {
    /// `min(bandwidth / bandwidth_ref, 1)`.
    pub bandwidth: u32,
    /// `max(1 − latency / latency_max, 0)`.
    pub latency: u32,
    /// `(1 − cpu_load) × min(cores / cores_ref, 1)`.
    pub compute: u32,
    /// The reputation score (see [`crate::Reputation::score`]).
    pub reputation: u32,
    /// `(4·bandwidth + 3·latency + 2·compute + 1·reputation) / 10`, rounded down.
    pub score: u32,
}

/// Scores a node from its latest sample, its core count and its reputation score.
///
/// Every term lies in `0..=SCORE_SCALE`; a missing reading contributes 0 to its term, so an
/// unknown quantity is never rewarded. Integer arithmetic only: every target computes the
/// same value.
///
/// Worked example, with the default [`ScoreConfig`]: 50 Mbit/s gives bandwidth 5,000; 20 ms
/// gives latency 8,000; 25% load on 4 cores gives compute 0.75 × 0.5 = 3,750; reputation
/// 9,000. Score = (4·5,000 + 3·8,000 + 2·3,750 + 9,000) / 10 = 6,050, i.e. 0.605.
///
/// ```
/// use ambient_core::{health_score, ScoreConfig, TelemetrySample};
/// let sample = TelemetrySample {
///     bandwidth_kbps: Some(50_000),
///     latency_us: Some(20_000),
///     cpu_load_permille: Some(250),
///     ..Default::default()
/// };
/// let terms = health_score(&ScoreConfig::default(), &sample, 4, 9_000);
/// assert_eq!(terms.score, 6_050);
/// ```
pub fn health_score(
    config: &ScoreConfig,
    sample: &TelemetrySample,
    cores: u16,
    reputation: u32,
) -> HealthTerms {
    let s = SCORE_SCALE as u64;
    let bandwidth = match sample.bandwidth_kbps {
        Some(bw) if config.bandwidth_ref_kbps > 0 => {
            (bw as u64 * s / config.bandwidth_ref_kbps as u64).min(s)
        }
        Some(_) => s,
        None => 0,
    };
    let latency = match sample.latency_us {
        Some(l) if config.latency_max_us > 0 => {
            s - (l as u64 * s / config.latency_max_us as u64).min(s)
        }
        _ => 0,
    };
    let compute = match sample.cpu_load_permille {
        Some(load) => {
            let free = 1000 - (load as u64).min(1000);
            let capacity = if config.cores_ref == 0 {
                s
            } else {
                (cores as u64 * s / config.cores_ref as u64).min(s)
            };
            free * capacity / 1000
        }
        None => 0,
    };
    let reputation = (reputation as u64).min(s);
    let score = (4 * bandwidth + 3 * latency + 2 * compute + reputation) / 10;
    HealthTerms {
        bandwidth: bandwidth as u32,
        latency: latency as u32,
        compute: compute as u32,
        reputation: reputation as u32,
        score: score as u32,
    }
}
