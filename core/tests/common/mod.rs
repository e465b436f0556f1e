//! Fixed values shared by the tests: every golden vector is built from these, so a change here
//! is a change to every pinned byte string.
#![allow(dead_code)] // Each test file uses a different subset.

use ambient_core::{
    Abi, Announce, Assignment, Digest, Engine, Exit, Identity, Limits, Receipt, SignedAnnounce,
    SignedReceipt, SignedTelemetry, TaskId, Telemetry, TelemetrySample, ThrottleFlags, sha3_256,
    sign_message,
};

/// The node's fixed secret key: ed25519 signing is deterministic, so signatures are stable too.
pub const SECRET: [u8; 32] = [7; 32];
/// A second node, for "signed by someone else" cases.
pub const OTHER_SECRET: [u8; 32] = [9; 32];

pub fn identity() -> Identity {
    Identity::from_secret(&SECRET)
}

pub fn other_identity() -> Identity {
    Identity::from_secret(&OTHER_SECRET)
}

pub fn task_id() -> TaskId {
    TaskId::new("task-001").expect("a valid task id")
}

pub const MODULE: &[u8] = b"\0asm\x01\0\0\0";
pub const INPUT: &[u8] = b"hello";
pub const OUTPUT: &[u8] = b"HELLO";

/// Small limits, so every varint in the golden bytes is short enough to read.
pub fn limits() -> Limits {
    Limits {
        memory_bytes: 64 << 20,
        timeout_ms: 5_000,
        fuel: 1_000_000,
    }
}

pub fn receipt() -> Receipt {
    Receipt {
        task_id: task_id(),
        attempt: 1,
        node: identity().node_id(),
        module: sha3_256(MODULE),
        input: sha3_256(INPUT),
        output: sha3_256(OUTPUT),
        fuel_used: 807,
        limits: limits(),
        engine: Engine::Wasmtime,
        exit: Exit::Ok,
    }
}

pub fn signed_receipt() -> SignedReceipt {
    receipt().sign(&identity())
}

pub fn announce() -> SignedAnnounce {
    let id = identity();
    let mut labels = heapless::Vec::new();
    for l in ["gpu", "room-2"] {
        labels
            .push(heapless::String::try_from(l).expect("short label"))
            .expect("two labels fit");
    }
    let announce = Announce {
        node: id.node_id(),
        public_key: id.public_key(),
        arch: heapless::String::try_from("aarch64").expect("fits"),
        cores: 4,
        mem_total_bytes: 8 << 30,
        engine: Engine::Wasmtime,
        agent_version: heapless::String::try_from("0.1.0").expect("fits"),
        labels,
        profile: Some(heapless::String::try_from("pi5").expect("fits")),
        max_concurrency: 2,
        fuel_per_s: core::num::NonZeroU64::new(1_000_000_000),
    };
    let signature = sign_message(&id, SignedAnnounce::TAG, &announce).expect("announce fits");
    SignedAnnounce {
        announce,
        signature,
    }
}

pub fn sample() -> TelemetrySample {
    TelemetrySample {
        bandwidth_kbps: Some(50_000),
        latency_us: Some(20_000),
        cpu_load_permille: Some(250),
        mem_free_bytes: Some(1 << 30),
        temp_millic: Some(61_500),
        throttle: ThrottleFlags::default(),
        tasks_running: 1,
        errors: 0,
        breaker: ambient_core::BreakerState::Closed,
        simulated: false,
    }
}

pub fn telemetry() -> SignedTelemetry {
    let id = identity();
    let telemetry = Telemetry {
        node: id.node_id(),
        seq: 42,
        boot_id: 0x0123_4567_89ab_cdef,
        sample: sample(),
    };
    let signature = sign_message(&id, SignedTelemetry::TAG, &telemetry).expect("telemetry fits");
    SignedTelemetry {
        telemetry,
        signature,
    }
}

/// The coordinator's fixed identity (secret key `[8; 32]`).
pub fn coordinator() -> Identity {
    Identity::from_secret(&[8; 32])
}

/// An assignment to [`identity`]'s node, signed by [`coordinator`].
pub fn assignment() -> Assignment<'static> {
    let mut a = Assignment {
        task_id: task_id(),
        attempt: 1,
        module: sha3_256(MODULE),
        abi: Abi::Plain,
        entry: heapless::String::try_from("run").expect("fits"),
        limits: limits(),
        input: INPUT,
        coordinator: [0; 32],
        batch: heapless::Vec::new(),
        signature: [0; 64],
    };
    a.sign(&coordinator(), &identity().node_id(), &sha3_256(INPUT));
    a
}

pub fn digest(byte: u8) -> Digest {
    Digest([byte; 32])
}
