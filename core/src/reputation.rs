use serde::{Deserialize, Serialize};

use crate::SCORE_SCALE;

/// What a node has done: counts of task outcomes as judged by the coordinator.
///
/// The score is the mean of a Beta posterior with a Beta(2, 2) prior, where a verified task is
/// a success and a failure counts once, but a *disputed* result (one that lost a quorum or a
/// spot check) counts [`Reputation::DISPUTE_WEIGHT`] times: a wrong answer costs far more than
/// a right one earns, and a new node starts at 0.5 rather than at either extreme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reputation {
    /// Tasks the node reported as completed.
    pub completed: u32,
    /// Tasks that failed on the node (trap, timeout, refused mid-run, lost).
    pub failed: u32,
    /// Results accepted by verification.
    pub verified: u32,
    /// Results that verification showed to be wrong.
    pub disputed: u32,
}

impl Reputation {
    /// How many failures one disputed result weighs.
    pub const DISPUTE_WEIGHT: u64 = 10;
    /// Prior pseudo-counts of successes and of failures.
    const PRIOR: u64 = 2;

    /// The score in `0..=SCORE_SCALE`: `(2 + verified) / (4 + verified + failed + 10·disputed)`.
    ///
    /// ```
    /// use ambient_core::Reputation;
    /// assert_eq!(Reputation::default().score(), 5_000);
    /// let caught = Reputation { verified: 20, disputed: 1, ..Default::default() };
    /// assert_eq!(caught.score(), 6_470); // 22 / 34
    /// ```
    pub fn score(&self) -> u32 {
        let good = Self::PRIOR + self.verified as u64;
        let bad = Self::PRIOR + self.failed as u64 + Self::DISPUTE_WEIGHT * self.disputed as u64;
        (good * SCORE_SCALE as u64 / (good + bad)) as u32
    }
}
