//! Checking a receipt against its assignment, majority voting between replicas, and rewards.

use crate::{Digest, Exit, Limits, NodeId, SignedReceipt, TaskId, VerifyError, sha3_256};

/// What a receipt must match: the assignment as the coordinator made it.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The task.
    pub task_id: &'a TaskId,
    /// The attempt assigned.
    pub attempt: u16,
    /// The node assigned.
    pub node: NodeId,
    /// That node's registered public key.
    pub public_key: &'a [u8; 32],
    /// sha3-256 of the module.
    pub module: Digest,
    /// sha3-256 of the input.
    pub input: Digest,
    /// Limits assigned.
    pub limits: Limits,
}

/// Checks a receipt and the output delivered with it: signature (strict), task, node, every
/// hash, limits, and fuel within the limit.
///
/// # Errors
/// The first [`VerifyError`] found.
pub fn verify_receipt(
    signed: &SignedReceipt,
    output: &[u8],
    expected: &Expected<'_>,
) -> Result<(), VerifyError> {
    if signed.receipt.node != expected.node {
        return Err(VerifyError::WrongNode);
    }
    signed.verify_signature(expected.public_key)?;
    verify_receipt_claims(signed, output, expected)
}

/// Everything [`verify_receipt`] checks but the signature, for a receipt whose signature was
/// already checked under `expected.public_key` (see [`SignedReceipt::verify_signature_by`]).
///
/// # Errors
/// The first [`VerifyError`] found.
pub fn verify_receipt_claims(
    signed: &SignedReceipt,
    output: &[u8],
    expected: &Expected<'_>,
) -> Result<(), VerifyError> {
    let r = &signed.receipt;
    if r.node != expected.node {
        return Err(VerifyError::WrongNode);
    }
    if &r.task_id != expected.task_id || r.attempt != expected.attempt {
        return Err(VerifyError::WrongTask);
    }
    if r.module != expected.module {
        return Err(VerifyError::ModuleMismatch);
    }
    if r.input != expected.input {
        return Err(VerifyError::InputMismatch);
    }
    if r.limits != expected.limits {
        return Err(VerifyError::LimitsMismatch);
    }
    if r.fuel_used > r.limits.fuel {
        return Err(VerifyError::FuelOverLimit {
            used: r.fuel_used,
            limit: r.limits.fuel,
        });
    }
    if r.output != sha3_256(output) {
        return Err(VerifyError::OutputMismatch);
    }
    Ok(())
}

/// The lead a result needs over the next most common one when the replicas disagree.
///
/// Why a lead and not a majority: let each node independently be a colluder with probability
/// `f`, colluders all returning the same wrong output and honest nodes the right one. Given
/// that two outputs compete, the odds that the one leading by `d` votes is the wrong one are
/// `(f / (1 − f))^d`, whatever the vote counts. A 2–1 vote is wrong one time in five at
/// `f = 0.2`, and the minority it would dispute is then an honest node; a lead of 3 takes that
/// to one in sixty-five. Disagreement is rare (it needs a liar), so the extra replicas cost
/// little. Measured with `ambient sim --colluders 0.2` (100,000 tasks on 1,000 nodes): a 2–1
/// majority blacklisted 39 honest nodes and accepted 74 wrong results; a lead of 3, 0 to 3
/// and 25 to 47 over three seeds, with about 25 tasks failed undecided at 7 replicas.
pub const CONTESTED_LEAD: usize = 3;

/// The state of a replicated task after some replicas reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quorum {
    /// A strict majority of the `k` replicas agree, and when any replica disagrees they lead
    /// the next most common result by [`CONTESTED_LEAD`] (or by as much as the pool allows);
    /// `index` points at one of them.
    Accepted {
        /// Index into the votes of a member of the majority.
        index: usize,
        /// How many agree.
        agreeing: usize,
    },
    /// No decision yet, and one is still possible with the replicas outstanding.
    Pending,
    /// No decision is possible with `k` replicas: escalate to more replicas.
    Split {
        /// The fewest replicas with which one is possible again (at most the cap): every
        /// new one agreeing with the current leader would decide.
        decidable_at: usize,
    },
    /// No decision is possible within the cap: the task fails, and no one is outvoted.
    Undecidable,
}

/// Counts votes of replicas, each `(output hash, fuel used, exit)`, for a task that has `k`
/// replicas and can have at most `cap` (the distinct nodes able to run it, at most the
/// coordinator's limit). Agreement means identical output hash *and* fuel *and* exit:
/// deterministic execution makes honest replicas identical.
///
/// A result is accepted when a strict majority of the `k` replicas agree on it and, if any
/// replica disagrees, it leads the runner-up by [`CONTESTED_LEAD`]. Unanimous votes need only
/// the majority: two replicas agreeing of `replicate:3` are accepted before the third reports.
/// A pool too small for that lead (fewer than five able nodes after a 1–1 split) decides by
/// the largest lead it can reach, a strict majority at worst: a shelf of three devices still
/// outvotes its one liar.
pub fn quorum(votes: &[(Digest, u64, Exit)], k: usize, cap: usize) -> Quorum {
    let count = |v: &(Digest, u64, Exit)| votes.iter().filter(|w| *w == v).count();
    let (mut best, mut runner_up) = ((0usize, 0usize), 0usize);
    for (i, v) in votes.iter().enumerate() {
        if votes[..i].contains(v) {
            continue;
        }
        let n = count(v);
        if n > best.1 {
            runner_up = best.1;
            best = (i, n);
        } else {
            runner_up = runner_up.max(n);
        }
    }
    let (index, agreeing) = best;
    let dissent = agreeing < votes.len();
    for lead in (1..=CONTESTED_LEAD).rev() {
        // Whether `k` replicas can decide with this lead: the best case is the leader taking
        // every one not reported yet.
        let decides = |k: usize, agreeing: usize| {
            agreeing > k / 2 && (!dissent || agreeing - runner_up >= lead)
        };
        let best_case = |k: usize| decides(k, agreeing + k.saturating_sub(votes.len()));
        if decides(k, agreeing) {
            return Quorum::Accepted { index, agreeing };
        }
        if votes.len() < k && best_case(k) {
            return Quorum::Pending;
        }
        if let Some(decidable_at) = (k + 1..=cap).find(|&m| best_case(m)) {
            return Quorum::Split { decidable_at };
        }
    }
    Quorum::Undecidable
}

/// Prices work: reward = `base` + fuel × `per_million_fuel` / 10^6, in micro-credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tariff {
    /// Paid for every accepted result, in micro-credits.
    pub base: u64,
    /// Paid per million fuel units consumed, in micro-credits.
    pub per_million_fuel: u64,
}

impl Default for Tariff {
    /// 1,000 µcredits per task plus 1 µcredit per million fuel.
    fn default() -> Self {
        Self {
            base: 1_000,
            per_million_fuel: 1,
        }
    }
}

impl Tariff {
    /// The reward for a result that used `fuel`, saturating at `u64::MAX`.
    pub fn reward(&self, fuel: u64) -> u64 {
        let variable = fuel as u128 * self.per_million_fuel as u128 / 1_000_000;
        (self.base as u128 + variable).min(u64::MAX as u128) as u64
    }
}
