//! `verify_receipt`: a receipt is accepted only if everything about it matches the assignment.

mod common;

use ambient_core::{
    Digest, Expected, Identity, Limits, ProofError, Receipt, Refusal, SignedReceipt, SignedRefusal,
    TaskId, VerifyError, sha3_256, verify_receipt,
};
use common::*;

fn expected<'a>(task: &'a TaskId, public_key: &'a [u8; 32]) -> Expected<'a> {
    Expected {
        task_id: task,
        attempt: 1,
        node: identity().node_id(),
        public_key,
        module: sha3_256(MODULE),
        input: sha3_256(INPUT),
        limits: limits(),
    }
}

/// Verifies a receipt the node honestly signed after `tamper` changed it.
fn verify_signed(tamper: impl FnOnce(&mut Receipt), output: &[u8]) -> Result<(), VerifyError> {
    let mut r = receipt();
    tamper(&mut r);
    let signed = r.sign(&identity());
    let (task, pk) = (task_id(), identity().public_key());
    verify_receipt(&signed, output, &expected(&task, &pk))
}

#[test]
fn an_honest_receipt_is_accepted() {
    assert_eq!(verify_signed(|_| {}, OUTPUT), Ok(()));
}

#[test]
fn a_receipt_changed_after_signing_is_rejected_as_a_bad_signature() {
    let mut signed = signed_receipt();
    signed.receipt.fuel_used -= 1; // claim less fuel to look cheaper
    let (task, pk) = (task_id(), identity().public_key());
    assert_eq!(
        verify_receipt(&signed, OUTPUT, &expected(&task, &pk)),
        Err(VerifyError::Proof(ProofError::BadSignature))
    );
}

#[test]
fn a_forged_signature_is_rejected() {
    let mut signed = signed_receipt();
    signed.signature[0] ^= 1;
    let (task, pk) = (task_id(), identity().public_key());
    assert_eq!(
        verify_receipt(&signed, OUTPUT, &expected(&task, &pk)),
        Err(VerifyError::Proof(ProofError::BadSignature))
    );
}

#[test]
fn a_receipt_signed_by_another_key_for_the_assigned_node_is_rejected() {
    // Claims to be the assigned node, but is signed with another node's key.
    let signed = receipt().sign(&other_identity());
    let (task, pk) = (task_id(), identity().public_key());
    assert_eq!(
        verify_receipt(&signed, OUTPUT, &expected(&task, &pk)),
        Err(VerifyError::Proof(ProofError::BadSignature))
    );
}

#[test]
fn a_receipt_from_another_node_is_rejected_even_with_a_valid_signature() {
    let other = other_identity();
    let signed = Receipt {
        node: other.node_id(),
        ..receipt()
    }
    .sign(&other);
    assert_eq!(signed.verify_signature(&other.public_key()), Ok(()));
    let (task, pk) = (task_id(), identity().public_key());
    assert_eq!(
        verify_receipt(&signed, OUTPUT, &expected(&task, &pk)),
        Err(VerifyError::WrongNode)
    );
}

#[test]
fn a_public_key_that_is_not_a_curve_point_is_rejected() {
    let signed = signed_receipt();
    let task = task_id();
    // y = 2 does not decompress to a point on edwards25519.
    let mut bad_key = [0u8; 32];
    bad_key[0] = 2;
    assert_eq!(
        verify_receipt(&signed, OUTPUT, &expected(&task, &bad_key)),
        Err(VerifyError::Proof(ProofError::BadPublicKey))
    );
}

#[test]
fn a_receipt_for_another_task_or_attempt_is_rejected() {
    let other_task = TaskId::new("task-002").expect("valid");
    assert_eq!(
        verify_signed(|r| r.task_id = other_task, OUTPUT),
        Err(VerifyError::WrongTask)
    );
    assert_eq!(
        verify_signed(|r| r.attempt = 2, OUTPUT),
        Err(VerifyError::WrongTask)
    );
}

#[test]
fn each_wrong_hash_is_rejected_with_its_own_error() {
    assert_eq!(
        verify_signed(|r| r.module = digest(1), OUTPUT),
        Err(VerifyError::ModuleMismatch)
    );
    assert_eq!(
        verify_signed(|r| r.input = digest(2), OUTPUT),
        Err(VerifyError::InputMismatch)
    );
    assert_eq!(
        verify_signed(|r| r.output = digest(3), OUTPUT),
        Err(VerifyError::OutputMismatch)
    );
    // The receipt is honest, but the output delivered beside it is not the one it hashed.
    assert_eq!(
        verify_signed(|_| {}, b"HELLO!"),
        Err(VerifyError::OutputMismatch)
    );
}

#[test]
fn fuel_over_the_limit_is_rejected() {
    let limit = limits().fuel;
    assert_eq!(
        verify_signed(|r| r.fuel_used = limit, OUTPUT),
        Ok(()),
        "exactly the limit is fine"
    );
    assert_eq!(
        verify_signed(|r| r.fuel_used = limit + 1, OUTPUT),
        Err(VerifyError::FuelOverLimit {
            used: limit + 1,
            limit
        })
    );
}

#[test]
fn limits_other_than_the_assigned_ones_are_rejected() {
    // A node cannot raise its own fuel limit to make an over-long run look legitimate.
    let raised = Limits {
        fuel: limits().fuel * 10,
        ..limits()
    };
    assert_eq!(
        verify_signed(
            |r| {
                r.limits = raised;
                r.fuel_used = raised.fuel
            },
            OUTPUT
        ),
        Err(VerifyError::LimitsMismatch)
    );
    let more_memory = Limits {
        memory_bytes: limits().memory_bytes + 1,
        ..limits()
    };
    assert_eq!(
        verify_signed(|r| r.limits = more_memory, OUTPUT),
        Err(VerifyError::LimitsMismatch)
    );
}

#[test]
fn every_receipt_field_changes_the_commitment() {
    let base = receipt().commitment();
    let variants: [fn(&mut Receipt); 9] = [
        |r| r.task_id = TaskId::new("task-002").expect("valid"),
        |r| r.attempt += 1,
        |r| r.node = other_identity().node_id(),
        |r| r.module = Digest([0; 32]),
        |r| r.input = Digest([0; 32]),
        |r| r.output = Digest([0; 32]),
        |r| r.fuel_used += 1,
        |r| r.limits.timeout_ms += 1,
        |r| r.exit = ambient_core::Exit::Trapped,
    ];
    for (i, change) in variants.iter().enumerate() {
        let mut r = receipt();
        change(&mut r);
        assert_ne!(
            r.commitment(),
            base,
            "change {i} left the commitment unchanged"
        );
    }
}

#[test]
fn verify_errors_say_what_failed() {
    assert_eq!(
        VerifyError::FuelOverLimit {
            used: 11,
            limit: 10
        }
        .to_string(),
        "receipt claims 11 fuel, over the task's limit of 10"
    );
    assert_eq!(
        VerifyError::Proof(ProofError::BadSignature).to_string(),
        "receipt signature: signature does not verify"
    );
}

#[test]
fn a_signed_receipt_round_trips_through_postcard() {
    let signed = signed_receipt();
    let bytes = postcard::to_stdvec(&signed).expect("encodes");
    let back: SignedReceipt = postcard::from_bytes(&bytes).expect("decodes");
    assert_eq!(back, signed);
}

#[test]
fn only_false_claims_the_node_signed_for_this_attempt_count_against_it() {
    let other_task = TaskId::new("task-002").expect("valid");
    let stranger = Identity::from_secret(&[9; 32]);
    let (task, pk) = (task_id(), identity().public_key());
    let forged = receipt().sign(&stranger);
    let not_the_node = verify_receipt(&forged, OUTPUT, &expected(&task, &pk)).unwrap_err();
    // Anyone on the broker could have sent these: a forgery, a replay of another attempt's
    // receipt, or a genuine receipt with other output bytes beside it.
    for e in [
        not_the_node,
        verify_signed(|r| r.attempt = 2, OUTPUT).unwrap_err(),
        verify_signed(|r| r.task_id = other_task, OUTPUT).unwrap_err(),
        verify_signed(|_| {}, b"HELLO!").unwrap_err(),
    ] {
        assert!(!e.is_attributable(), "{e}");
    }
    // Only the node's key could have signed these for this attempt.
    for e in [
        verify_signed(|r| r.module = digest(1), OUTPUT).unwrap_err(),
        verify_signed(|r| r.input = digest(2), OUTPUT).unwrap_err(),
        verify_signed(|r| r.fuel_used = u64::MAX, OUTPUT).unwrap_err(),
    ] {
        assert!(e.is_attributable(), "{e}");
    }
}

#[test]
fn a_refusal_verifies_only_for_the_attempt_and_node_it_names() {
    let node = identity().node_id();
    let (task, pk) = (task_id(), identity().public_key());
    let refusal = SignedRefusal::sign(&identity(), &task, 1, &node, Refusal::Busy);
    assert_eq!(refusal.verify(&pk, &task, 1, &node), Ok(()));
    assert_eq!(
        refusal.verify(&pk, &task, 2, &node),
        Err(ProofError::BadSignature),
        "replayed for another attempt"
    );
    let other_task = TaskId::new("task-002").expect("valid");
    assert!(refusal.verify(&pk, &other_task, 1, &node).is_err());
    let changed = SignedRefusal {
        refusal: Refusal::ModuleUnavailable,
        ..refusal
    };
    assert!(
        changed.verify(&pk, &task, 1, &node).is_err(),
        "reason changed"
    );
    let stranger = Identity::from_secret(&[9; 32]);
    let forged = SignedRefusal::sign(&stranger, &task, 1, &node, Refusal::Busy);
    assert!(forged.verify(&pk, &task, 1, &node).is_err(), "another key");
}

#[test]
fn an_assignment_verifies_only_for_the_node_and_input_it_was_signed_for() {
    let a = assignment();
    let node = identity().node_id();
    let input = sha3_256(INPUT);
    assert_eq!(a.verify(&node, &input), Ok(()));
    assert_eq!(a.coordinator, coordinator().public_key());
    let other_node = Identity::from_secret(&[9; 32]).node_id();
    assert!(
        a.verify(&other_node, &input).is_err(),
        "replayed to another node"
    );
    assert!(a.verify(&node, &digest(1)).is_err(), "another input");
    let mut changed = a.clone();
    changed.attempt = 2;
    assert!(changed.verify(&node, &input).is_err(), "another attempt");
    let mut forged = a.clone();
    forged.sign(&Identity::from_secret(&[9; 32]), &node, &input);
    assert_eq!(forged.verify(&node, &input), Ok(()), "self-consistent");
    assert_ne!(
        forged.coordinator, a.coordinator,
        "but under another key, which a node that pinned the real one refuses"
    );
}

#[test]
fn one_signature_covers_a_batch_and_each_of_its_assignments_verifies_only_as_listed() {
    let node = identity().node_id();
    let input = sha3_256(INPUT);
    let mut batch: Vec<_> = (1..=3u16)
        .map(|attempt| {
            let mut a = assignment();
            a.attempt = attempt;
            a
        })
        .collect();
    let claims: heapless::Vec<Digest, { ambient_core::MAX_BATCH }> = batch
        .iter()
        .map(|a| a.claim_digest(&node, &input).unwrap())
        .collect();
    for a in &mut batch {
        a.seal(&coordinator(), &claims);
    }
    let key = ambient_core::PublicKey::from_bytes(&coordinator().public_key()).unwrap();
    for a in &batch {
        assert_eq!(a.verify(&node, &input), Ok(()), "attempt {}", a.attempt);
        assert_eq!(a.signature, batch[0].signature, "one signature for all");
    }
    let mut unlisted = batch[0].clone();
    unlisted.attempt = 4;
    assert!(
        unlisted.verify_claim(&node, &input).is_err(),
        "an assignment the batch does not list, under its valid signature"
    );
    assert_eq!(
        unlisted.verify_batch_by(&key),
        Ok(()),
        "the signature alone is fine"
    );
    let mut grown = batch[0].clone();
    grown
        .batch
        .push(unlisted.claim_digest(&node, &input).unwrap())
        .unwrap();
    grown.attempt = 4;
    assert_eq!(grown.verify_claim(&node, &input), Ok(()));
    assert!(
        grown.verify_batch_by(&key).is_err(),
        "a digest added to a signed batch breaks its signature"
    );
    let other_node = Identity::from_secret(&[9; 32]).node_id();
    assert!(
        batch[1].verify(&other_node, &input).is_err(),
        "replayed to another node"
    );
}
