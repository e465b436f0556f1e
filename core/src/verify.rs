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
    let r = &signed.receipt;
    if r.node != expected.node {
        return Err(VerifyError::WrongNode);
    }
    signed.verify_signature(expected.public_key)?;
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

/// The state of a replicated task after some replicas reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quorum {
    /// A strict majority of the `k` replicas agree; `index` points at one of them.
    Accepted {
        /// Index into the votes of a member of the majority.
        index: usize,
        /// How many agree.
        agreeing: usize,
    },
    /// No majority yet, and one is still possible with the replicas outstanding.
    Pending,
    /// Every replica reported and no strict majority agrees: escalate to more replicas.
    Split,
}

/// Counts votes of replicas, each `(output hash, fuel used, exit)`. Agreement means identical
/// output hash *and* fuel *and* exit: deterministic execution makes honest replicas identical.
pub fn quorum(votes: &[(Digest, u64, Exit)], k: usize) -> Quorum {
    let need = k / 2 + 1;
    let mut best = (0usize, 0usize);
    for (i, v) in votes.iter().enumerate() {
        let n = votes.iter().filter(|w| *w == v).count();
        if n > best.1 {
            best = (i, n);
        }
    }
    if best.1 >= need {
        return Quorum::Accepted {
            index: best.0,
            agreeing: best.1,
        };
    }
    if votes.len() >= k || best.1 + (k - votes.len()) < need {
        return Quorum::Split;
    }
    Quorum::Pending
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
