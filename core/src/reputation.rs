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

/// How far a node's results can be trusted, from how many of them in a row agreed with other
/// nodes' results: Sarmenta's credibility under spot-checking with blacklisting (L. Sarmenta,
/// "Sabotage-tolerance mechanisms for volunteer computing systems", 2002), in
/// `0..=SCORE_SCALE`.
///
/// With a fraction `f` of nodes faulty, and every node caught with a wrong result blacklisted
/// (so a saboteur that survived `k` checks has been lucky `k` times), the chance that a node
/// which passed `k` checks in a row is a saboteur is at most
///
/// ```text
///     f / ((1 − f) · k · e)        (k ≥ 1)
/// ```
///
/// whatever rate it sabotages at: sabotaging often gets it caught, rarely does little harm;
/// the worst rate gives the bound. Credibility is one minus that, and `1 − f` for a node never
/// checked (the bound is capped at `f`: it never makes a node less credible than an unknown
/// one). The bound assumes the checks are independent: colluders that answer each other's
/// checks alike are not covered.
///
/// `faulty_permille` is `f` in permille (at most 999). Floating point is used only for `+ − × ÷`,
/// which IEEE 754 makes bit-for-bit the same on every device.
///
/// ```
/// use ambient_core::{SCORE_SCALE, credibility};
/// assert_eq!(credibility(0, 200), 8_000); // an unknown node: 1 − f
/// assert_eq!(credibility(10, 200), 9_908); // 1 − 0.2 / (0.8 · 10 · e)
/// assert_eq!(credibility(1_000, 200), 9_999);
/// ```
pub fn credibility(agreed_in_a_row: u32, faulty_permille: u32) -> u32 {
    let scale = f64::from(SCORE_SCALE);
    // Truncation towards zero: a node is never rounded up into credibility.
    ((1.0 - doubt(agreed_in_a_row, faulty_permille)) * scale) as u32
}

/// One minus [`credibility`], unrounded: the bound on the chance that a result from a node
/// which agreed with others `agreed_in_a_row` times in a row is wrong. `f` for a node never
/// checked, `f / ((1 − f) · k · e)` after `k` agreements, never above `f`.
///
/// ```
/// use ambient_core::doubt;
/// assert_eq!(doubt(0, 100), 0.1);
/// assert!(doubt(409, 100) <= 1e-4 && doubt(408, 100) > 1e-4);
/// ```
pub fn doubt(agreed_in_a_row: u32, faulty_permille: u32) -> f64 {
    let f = f64::from(faulty_permille.min(999)) / 1_000.0;
    if agreed_in_a_row == 0 {
        return f;
    }
    let bound = f / ((1.0 - f) * f64::from(agreed_in_a_row) * core::f64::consts::E);
    if bound < f { bound } else { f }
}

/// The chance that an accepted result is wrong, from the [`doubt`] of each node that returned
/// it and of each node that returned something else: Sarmenta's credibility of a result group,
/// for the worst case.
///
/// The result is wrong only if every node that returned it is faulty and they returned the
/// same wrong output: colluders (independent liars never agree on a wrong output). It is right
/// only if every dissenting node is faulty. Weighing the two, and counting any dissent as
/// possible either way when the result is wrong:
///
/// ```text
///               Π dᵢ                    i: the agreeing nodes
///     ─────────────────────────         j: the dissenting nodes
///     Π dᵢ + Π (1 − dᵢ) · Π dⱼ
/// ```
///
/// So agreement multiplies doubts, and a dissent from a credible node weighs heavily: two
/// nodes never checked in a pool assumed one-in-five faulty leave 0.04 / (0.04 + 0.64) ≈
/// 5.9e-2 with no dissent; a never-checked node and one that agreed 40 times leave 5.8e-4.
/// No agreeing node (no result) is certain doubt, 1.
///
/// ```
/// use ambient_core::{doubt, result_doubt};
/// assert_eq!(result_doubt([0.2], []), 0.2);
/// let pair = result_doubt([doubt(0, 200), doubt(0, 200)], []);
/// assert!((pair - 0.04 / 0.68).abs() < 1e-12);
/// // Two nodes at 1e-3 outvoting one at 1e-4: about 1e-2, not 1e-6.
/// let contested = result_doubt([1e-3, 1e-3], [1e-4]);
/// assert!(contested > 9e-3 && contested < 1e-2);
/// assert_eq!(result_doubt([], [0.5]), 1.0);
/// ```
pub fn result_doubt(
    agreeing: impl IntoIterator<Item = f64>,
    dissenting: impl IntoIterator<Item = f64>,
) -> f64 {
    let (mut wrong, mut right, mut any) = (1.0, 1.0, false);
    for d in agreeing {
        wrong *= d;
        right *= 1.0 - d;
        any = true;
    }
    for d in dissenting {
        right *= d;
    }
    if !any || wrong + right == 0.0 {
        return 1.0;
    }
    wrong / (wrong + right)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credibility_grows_with_agreements_and_never_starts_below_an_unknown_node() {
        let mut last = 0;
        for k in 0..200 {
            let c = credibility(k, 100);
            assert!(c >= last, "k={k}: {c} < {last}");
            assert!(c >= 9_000, "never below 1 − f");
            assert!(c < SCORE_SCALE, "never certain");
            last = c;
        }
    }

    #[test]
    fn credibility_reaches_an_error_of_one_in_ten_thousand_after_enough_checks() {
        // 0.1 / (0.9 · k · e) ≤ 1e-4  ⇔  k ≥ 409
        assert!(credibility(409, 100) >= SCORE_SCALE - 1);
        assert!(credibility(100, 100) < SCORE_SCALE - 3);
    }

    #[test]
    fn each_agreeing_node_lowers_the_doubt_of_a_result_and_a_certain_liar_keeps_it_wrong() {
        let mut doubts = vec![doubt(0, 200)];
        let mut last = result_doubt(doubts.iter().copied(), []);
        for k in [0, 3, 40, 1_000] {
            doubts.push(doubt(k, 200));
            let now = result_doubt(doubts.iter().copied(), []);
            assert!(now < last, "{k}: {now} !< {last}");
            last = now;
        }
        assert_eq!(result_doubt([1.0, 0.5], []), 1.0);
        assert_eq!(result_doubt([0.0, 0.5], []), 0.0);
    }

    #[test]
    fn a_dissent_raises_the_doubt_of_a_result_the_more_credible_the_dissenter() {
        let agreeing = [doubt(40, 200); 3];
        let alone = result_doubt(agreeing, []);
        let mut last = alone;
        for k in [0, 10, 100, 1_000] {
            let with = result_doubt(agreeing, [doubt(k, 200)]);
            assert!(with > last, "dissenter at {k}: {with} !> {last}");
            last = with;
        }
        // A dissenter known to be faulty (doubt 1) changes nothing.
        assert_eq!(result_doubt(agreeing, [1.0]), alone);
    }
}
