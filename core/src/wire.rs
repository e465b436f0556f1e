//! The wire protocol: one versioned envelope, postcard-encoded, for everything devices send and receive.
//!
//! Large byte fields (task input, output) borrow from the frame, so decoding never allocates.
//! Enums are append-only: a variant's index is its tag on the wire.

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

use crate::proof::serde_sig;
use crate::proof::{message_digest, verify_message_by};
use crate::{
    DecodeError, Digest, Engine, Identity, Limits, NodeId, ProofError, PublicKey, SignedReceipt,
    TaskId, TelemetrySample, TripReason, sign_message, verify_message,
};

/// Protocol version carried in every envelope.
pub const PROTOCOL_VERSION: u8 = 5;
/// Largest task input, in bytes.
pub const MAX_INPUT_BYTES: usize = 4 << 20;
/// Largest task output, in bytes.
pub const MAX_OUTPUT_BYTES: usize = 4 << 20;
/// Largest WASM module, in bytes. Modules travel on their own topic, outside envelopes.
pub const MAX_MODULE_BYTES: usize = 16 << 20;
/// Largest frame: the largest input or output plus room for the fixed-size fields.
pub const MAX_FRAME_BYTES: usize = MAX_INPUT_BYTES + (64 << 10);
/// Largest JSON task submission: a module and an input at their limits, both in base64, plus
/// room for the other fields.
pub const MAX_SUBMISSION_BYTES: usize =
    base64_len(MAX_MODULE_BYTES) + base64_len(MAX_INPUT_BYTES) + (64 << 10);
/// Largest MQTT packet an Ambient program sends or accepts (its "remaining length"): a
/// submission at its limit, with its topic and header. Brokers must allow at least this much
/// for every limit above to be answered with a message rather than a closed connection.
pub const MAX_PACKET_BYTES: usize = MAX_SUBMISSION_BYTES + (1 << 10);

/// Length of the base64 (padded) encoding of `n` bytes.
const fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Longest entry-point name.
pub const MAX_ENTRY_LEN: usize = 64;
/// Most assignments one signature covers ([`Assignment::batch`]).
pub const MAX_BATCH: usize = 16;
/// Most labels a node may announce.
pub const MAX_LABELS: usize = 8;
/// Longest label.
pub const MAX_LABEL_LEN: usize = 32;
/// Longest human-readable message in a report.
pub const MAX_MESSAGE_LEN: usize = 160;

/// The outer frame of every message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// Always [`PROTOCOL_VERSION`] when sent by this build.
    pub version: u8,
    /// The message.
    #[serde(borrow)]
    pub message: Message<'a>,
}

/// Everything nodes and coordinators say to each other. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// An assignment's batch makes it the largest variant (about 0.8 KiB); `Box` needs `alloc`,
// which the no_std core does without, and a message is decoded once per frame, on the stack.
#[allow(clippy::large_enum_variant)]
pub enum Message<'a> {
    /// Node → coordinator, retained on `nodes/{id}/announce`: who the node is.
    Announce(SignedAnnounce),
    /// Node → coordinator on `nodes/{id}/telemetry`: a signed reading.
    Telemetry(SignedTelemetry),
    /// Coordinator → node on `nodes/{id}/tasks`: run this.
    Assign(#[serde(borrow)] Assignment<'a>),
    /// Node → coordinator on `nodes/{id}/results`: what happened to an assignment.
    Report(#[serde(borrow)] Report<'a>),
    /// Node → coordinator on `nodes/{id}/telemetry`: latency and bandwidth probe.
    Ping(#[serde(borrow)] Ping<'a>),
    /// The answer to a probe, signed by the side that answers: coordinator → node on
    /// `nodes/{id}/tasks` for a [`Ping`], node → coordinator on `nodes/{id}/telemetry` for a
    /// [`Probe`].
    Pong(Pong),
    /// Coordinator → node on `nodes/{id}/tasks`: the coordinator's own latency and bandwidth
    /// probe, answered with a [`Pong`] the node signs.
    Probe(#[serde(borrow)] Probe<'a>),
}

/// A node's self-description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// Derived from `public_key`; receivers check that it is.
    pub node: NodeId,
    /// ed25519 public key that signs everything this node sends.
    pub public_key: [u8; 32],
    /// CPU architecture (`aarch64`, `x86_64`, `riscv64`, `arm`).
    pub arch: String<16>,
    /// Logical cores.
    pub cores: u16,
    /// Total memory, in bytes.
    pub mem_total_bytes: u64,
    /// The WASM engine it runs.
    pub engine: Engine,
    /// Agent version.
    pub agent_version: String<16>,
    /// Operator-chosen labels (`gpu`, `room-2`, ...).
    pub labels: Vec<String<MAX_LABEL_LEN>, MAX_LABELS>,
    /// The simulated device profile, when readings are simulated.
    pub profile: Option<String<24>>,
    /// Tasks it runs at once.
    pub max_concurrency: u16,
    /// Fuel this node burns per second on a real kernel (the digits classifier), measured by
    /// the agent when it starts; `None` when it could not measure. With a task's fuel limit it
    /// gives the node's worst-case run time, which latency-aware placement ranks by. A claim,
    /// like every field here: the coordinator caps it by what it observes.
    pub fuel_per_s: Option<core::num::NonZeroU64>,
}

/// An announce and the node's signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAnnounce {
    /// The announce.
    pub announce: Announce,
    /// Signature by `announce.public_key` (see [`crate::sign_message`], domain [`SignedAnnounce::TAG`]).
    #[serde(with = "serde_sig")]
    pub signature: [u8; 64],
}

impl SignedAnnounce {
    /// Domain-separation tag of announce signatures.
    pub const TAG: &'static [u8] = b"ambient/announce/v1\0";
}

/// A node's reading, numbered so that old samples cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Telemetry {
    /// The node.
    pub node: NodeId,
    /// Increases with every sample from one agent run; with `boot_id`, orders samples.
    pub seq: u64,
    /// Random per agent start, so a restart's `seq` from 0 is not mistaken for a replay.
    pub boot_id: u64,
    /// The reading.
    pub sample: TelemetrySample,
}

/// Telemetry and the node's signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTelemetry {
    /// The telemetry.
    pub telemetry: Telemetry,
    /// Signature (domain [`SignedTelemetry::TAG`]).
    #[serde(with = "serde_sig")]
    pub signature: [u8; 64],
}

impl SignedTelemetry {
    /// Domain-separation tag of telemetry signatures.
    pub const TAG: &'static [u8] = b"ambient/telemetry/v1\0";
}

/// How the module receives its input and returns its output (see the README's task ABI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Abi {
    /// Exports `memory`, `alloc(len) -> ptr` and `entry(ptr, len) -> (ptr << 32 | len)`.
    Plain,
    /// A WASI preview 1 command: stdin in, stdout out, `_start`.
    Wasi,
}

/// A task placed on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment<'a> {
    /// The task.
    pub task_id: TaskId,
    /// Dispatch attempt, from 1; a retry elsewhere gets the next number.
    pub attempt: u16,
    /// sha3-256 of the module; the node fetches it from `modules/{hash}` unless cached.
    pub module: Digest,
    /// Calling convention.
    pub abi: Abi,
    /// Exported function to call (ignored for WASI, which runs `_start`).
    pub entry: String<MAX_ENTRY_LEN>,
    /// Sandbox limits.
    pub limits: Limits,
    /// Input bytes.
    pub input: &'a [u8],
    /// The coordinator's ed25519 public key. A node pins the first one it sees (or the one
    /// its operator gave it) and runs only assignments signed by that key.
    pub coordinator: [u8; 32],
    /// The assignments signed together with this one, each as the digest of its claim
    /// ([`Assignment::claim_digest`]); this one's is among them. A coordinator that places
    /// several tasks on a node in one turn signs them once, and the node verifies the batch
    /// once ([`Assignment::verify_claim`], [`Assignment::verify_batch_by`]). Alone, a batch of
    /// one.
    pub batch: Vec<Digest, MAX_BATCH>,
    /// The coordinator's signature over [`Assignment::batch`] (domain [`Assignment::TAG`]).
    #[serde(with = "serde_sig")]
    pub signature: [u8; 64],
}

/// What an assignment commits to: everything the node acts on, with the input by its hash,
/// and the node it is addressed to (so it cannot be replayed to another node). Its digest
/// (domain [`Assignment::CLAIM_TAG`]) is what [`Assignment::batch`] lists.
#[derive(Debug, Serialize)]
struct AssignmentClaim<'a> {
    task_id: &'a TaskId,
    attempt: u16,
    node: &'a NodeId,
    module: &'a Digest,
    abi: Abi,
    entry: &'a str,
    limits: &'a Limits,
    input: &'a Digest,
}

impl Assignment<'_> {
    /// Domain-separation tag of assignment signatures (over [`Assignment::batch`]).
    pub const TAG: &'static [u8] = b"ambient/assign/v2\0";
    /// Domain-separation tag of the claim digests a batch lists.
    pub const CLAIM_TAG: &'static [u8] = b"ambient/assign-claim/v2\0";

    fn claim<'c>(&'c self, node: &'c NodeId, input: &'c Digest) -> AssignmentClaim<'c> {
        AssignmentClaim {
            task_id: &self.task_id,
            attempt: self.attempt,
            node,
            module: &self.module,
            abi: self.abi,
            entry: self.entry.as_str(),
            limits: &self.limits,
            input,
        }
    }

    /// The digest this assignment is listed by in a batch, addressed to `node`; `input` is
    /// the sha3-256 of [`Assignment::input`].
    ///
    /// # Errors
    /// [`ProofError::Encoding`] if the claim does not fit the signing buffer, which the
    /// bounded fields (task id and entry, 64 bytes each) rule out.
    pub fn claim_digest(&self, node: &NodeId, input: &Digest) -> Result<Digest, ProofError> {
        message_digest(Self::CLAIM_TAG, &self.claim(node, input))
    }

    /// Signs the assignment alone (a batch of one) as `coordinator`, addressed to `node`;
    /// `input` is the sha3-256 of [`Assignment::input`] (the caller usually has it already).
    pub fn sign(&mut self, coordinator: &Identity, node: &NodeId, input: &Digest) {
        let mut batch = Vec::new();
        // A claim always encodes, and a batch of one always fits; were either to fail, the
        // empty batch would list nothing and nothing would verify.
        if let Ok(claim) = self.claim_digest(node, input) {
            let _ = batch.push(claim);
        }
        self.seal(coordinator, &batch);
    }

    /// Puts the assignment under `batch` (its own [`Assignment::claim_digest`] among them)
    /// and `signature` ([`Assignment::sign_batch`] of it) made by `coordinator`.
    pub fn seal(&mut self, coordinator: &Identity, batch: &Vec<Digest, MAX_BATCH>) {
        self.coordinator = coordinator.public_key();
        self.signature = Self::sign_batch(coordinator, batch);
        self.batch.clone_from(batch);
    }

    /// The signature over a batch of claim digests: one ed25519 signature for every
    /// assignment in it.
    pub fn sign_batch(coordinator: &Identity, batch: &[Digest]) -> [u8; 64] {
        // At most MAX_BATCH digests: 16 × 32 bytes fit the signing buffer.
        sign_message(coordinator, Self::TAG, &batch).unwrap_or([0; 64])
    }

    /// Checks that [`Assignment::coordinator`] signed this assignment for `node`, `input` being
    /// the sha3-256 of [`Assignment::input`].
    ///
    /// # Errors
    /// [`ProofError`] when the key or signature is bad, or the batch does not list this
    /// assignment.
    pub fn verify(&self, node: &NodeId, input: &Digest) -> Result<(), ProofError> {
        self.verify_by(&PublicKey::from_bytes(&self.coordinator)?, node, input)
    }

    /// [`Assignment::verify`] with the coordinator's key already decompressed: a node checks
    /// every assignment against the one key it pinned.
    ///
    /// # Errors
    /// [`ProofError::BadSignature`] when the signature is bad, `key` is not
    /// [`Assignment::coordinator`] or the batch does not list this assignment.
    pub fn verify_by(
        &self,
        key: &PublicKey,
        node: &NodeId,
        input: &Digest,
    ) -> Result<(), ProofError> {
        self.verify_claim(node, input)?;
        self.verify_batch_by(key)
    }

    /// The half of [`Assignment::verify_by`] that needs no signature check: the batch lists
    /// this assignment, addressed to `node`.
    ///
    /// # Errors
    /// [`ProofError::BadSignature`] when it does not.
    pub fn verify_claim(&self, node: &NodeId, input: &Digest) -> Result<(), ProofError> {
        let claim = self.claim_digest(node, input)?;
        if self.batch.contains(&claim) {
            Ok(())
        } else {
            Err(ProofError::BadSignature)
        }
    }

    /// The other half: `key`, which must be [`Assignment::coordinator`], signed
    /// [`Assignment::batch`]. A node that already checked this batch and signature (another
    /// assignment of the same batch) need not check them again.
    ///
    /// # Errors
    /// [`ProofError::BadSignature`] when the signature is bad or `key` is not
    /// [`Assignment::coordinator`].
    pub fn verify_batch_by(&self, key: &PublicKey) -> Result<(), ProofError> {
        if key.to_bytes() != self.coordinator {
            return Err(ProofError::BadSignature);
        }
        verify_message_by(key, Self::TAG, &self.batch.as_slice(), &self.signature)
    }
}

/// A node's answer to an assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report<'a> {
    /// The task.
    pub task_id: TaskId,
    /// The attempt being answered.
    pub attempt: u16,
    /// The reporting node.
    pub node: NodeId,
    /// What happened.
    #[serde(borrow)]
    pub body: ReportBody<'a>,
}

/// What happened to an assignment. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// `Box` needs `alloc`, which the no_std core does without; a report is built once per task.
#[allow(clippy::large_enum_variant)]
pub enum ReportBody<'a> {
    /// It ran; the receipt says how it ended.
    Executed {
        /// Signed evidence.
        receipt: SignedReceipt,
        /// Output bytes (empty unless the run ended `Ok`).
        output: &'a [u8],
        /// Human-readable detail for failures, empty on success.
        message: String<MAX_MESSAGE_LEN>,
    },
    /// It did not run.
    Refused(SignedRefusal),
}

/// A refusal and the node's signature over the attempt it answers, so that nobody else can
/// refuse in a node's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRefusal {
    /// Why.
    pub refusal: Refusal,
    /// Signature over [`RefusalClaim`] (domain [`SignedRefusal::TAG`]).
    #[serde(with = "serde_sig")]
    pub signature: [u8; 64],
}

/// What a refusal's signature covers: the attempt it answers, who refuses and why.
#[derive(Debug, Serialize)]
struct RefusalClaim<'a> {
    task_id: &'a TaskId,
    attempt: u16,
    node: &'a NodeId,
    refusal: Refusal,
}

impl SignedRefusal {
    /// Domain-separation tag of refusal signatures.
    pub const TAG: &'static [u8] = b"ambient/refusal/v1\0";

    /// `identity` (the node `node`) refuses attempt `attempt` of `task_id`.
    pub fn sign(
        identity: &Identity,
        task_id: &TaskId,
        attempt: u16,
        node: &NodeId,
        refusal: Refusal,
    ) -> Self {
        let claim = RefusalClaim {
            task_id,
            attempt,
            node,
            refusal,
        };
        Self {
            refusal,
            // A task id is at most 64 bytes, so the claim always fits the signing buffer.
            signature: sign_message(identity, Self::TAG, &claim).unwrap_or([0; 64]),
        }
    }

    /// Checks that `public_key` refused attempt `attempt` of `task_id` as node `node`.
    ///
    /// # Errors
    /// [`ProofError`] when the key or signature is bad.
    pub fn verify(
        &self,
        public_key: &[u8; 32],
        task_id: &TaskId,
        attempt: u16,
        node: &NodeId,
    ) -> Result<(), ProofError> {
        let claim = RefusalClaim {
            task_id,
            attempt,
            node,
            refusal: self.refusal,
        };
        verify_message(public_key, Self::TAG, &claim, &self.signature)
    }
}

/// Why a node did not run an assignment. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The node's breaker is open.
    Breaker(TripReason),
    /// Every execution slot is taken.
    Busy,
    /// The module could not be fetched or did not match its hash.
    ModuleUnavailable,
    /// The agent is shutting down.
    ShuttingDown,
}

/// A node's probe of its link to the coordinator: the coordinator answers with a [`Pong`]
/// carrying the same nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping<'a> {
    /// The node.
    pub node: NodeId,
    /// Echoed back.
    pub nonce: u64,
    /// Filler that makes some pings large, so the node can estimate bandwidth.
    pub padding: &'a [u8],
}

/// The coordinator's probe of its link to a node: the node answers with a [`Pong`] it signs,
/// carrying the same nonce.
///
/// The nonce comes after the padding on the wire and is drawn at random, so a pong proves that
/// the whole frame arrived: a node cannot answer a large probe early to look faster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe<'a> {
    /// The node.
    pub node: NodeId,
    /// Filler that makes some probes large, so the coordinator can estimate bandwidth.
    pub padding: &'a [u8],
    /// Echoed back.
    pub nonce: u64,
}

/// The answer to a [`Ping`] or a [`Probe`], signed by the side that answers (the coordinator
/// for a ping, the node for a probe), so that nobody else can make a link look faster or
/// slower than it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The probe's nonce.
    pub nonce: u64,
    /// The answering side's ed25519 public key: the coordinator's (what agents pin) or the
    /// node's (what it announced).
    pub signer: [u8; 32],
    /// Signature over [`PongClaim`] (domain [`Pong::TAG`]).
    #[serde(with = "serde_sig")]
    pub signature: [u8; 64],
}

/// What a pong's signature covers: the node it answers and the nonce.
#[derive(Debug, Serialize)]
struct PongClaim<'a> {
    node: &'a NodeId,
    nonce: u64,
}

impl Pong {
    /// Domain-separation tag of pong signatures.
    pub const TAG: &'static [u8] = b"ambient/pong/v1\0";

    /// `signer` answers the probe `nonce` on the link to `node` (the coordinator answers a
    /// node's ping; a node answers the coordinator's probe with its own id).
    pub fn sign(signer: &Identity, node: &NodeId, nonce: u64) -> Self {
        Self {
            nonce,
            signer: signer.public_key(),
            // A node id and a nonce always fit the signing buffer.
            signature: sign_message(signer, Self::TAG, &PongClaim { node, nonce })
                .unwrap_or([0; 64]),
        }
    }

    /// Checks that [`Pong::signer`] signed this pong for `node`. Whether the signer is the one
    /// expected (the pinned coordinator, the node's announced key) is the caller's check.
    ///
    /// # Errors
    /// [`ProofError`] when the key or signature is bad.
    pub fn verify(&self, node: &NodeId) -> Result<(), ProofError> {
        let claim = PongClaim {
            node,
            nonce: self.nonce,
        };
        verify_message(&self.signer, Self::TAG, &claim, &self.signature)
    }
}

impl<'a> Envelope<'a> {
    /// Wraps a message in an envelope of the current version.
    pub fn new(message: Message<'a>) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            message,
        }
    }

    /// Decodes a frame, rejecting oversize frames before looking at them.
    ///
    /// # Errors
    /// A [`DecodeError`] for any frame that is not exactly one valid message within limits;
    /// never panics, whatever the bytes.
    pub fn decode(frame: &'a [u8]) -> Result<Self, DecodeError> {
        if frame.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::FrameTooLarge { len: frame.len() });
        }
        match frame.first() {
            Some(&PROTOCOL_VERSION) => {}
            Some(&found) => return Err(DecodeError::UnsupportedVersion { found }),
            None => return Err(DecodeError::Malformed),
        }
        let (envelope, rest) =
            postcard::take_from_bytes::<Envelope<'a>>(frame).map_err(|_| DecodeError::Malformed)?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes);
        }
        envelope.message.check_limits()?;
        Ok(envelope)
    }

    /// Encodes into `buf`, returning the used part.
    ///
    /// # Errors
    /// [`DecodeError::FrameTooLarge`] when the message does not fit `buf`.
    pub fn encode_to_slice<'b>(&self, buf: &'b mut [u8]) -> Result<&'b mut [u8], DecodeError> {
        let len = buf.len();
        postcard::to_slice(self, buf).map_err(|_| DecodeError::FrameTooLarge { len })
    }

    /// Encodes into a new vector.
    #[cfg(feature = "std")]
    pub fn to_vec(&self) -> std::vec::Vec<u8> {
        // Serialising into a growable vector only fails for types serde cannot express, and
        // every message type here is plain data.
        postcard::to_stdvec(self).unwrap_or_default()
    }
}

impl Message<'_> {
    fn check_limits(&self) -> Result<(), DecodeError> {
        let check = |field, len, max| {
            if len > max {
                Err(DecodeError::FieldTooLarge { field, len, max })
            } else {
                Ok(())
            }
        };
        match self {
            Message::Assign(a) => {
                check("input", a.input.len(), MAX_INPUT_BYTES)?;
                a.task_id
                    .is_valid()
                    .then_some(())
                    .ok_or(DecodeError::Malformed)
            }
            Message::Report(r) => {
                if let ReportBody::Executed { output, .. } = &r.body {
                    check("output", output.len(), MAX_OUTPUT_BYTES)?;
                }
                r.task_id
                    .is_valid()
                    .then_some(())
                    .ok_or(DecodeError::Malformed)
            }
            Message::Ping(p) => check("padding", p.padding.len(), MAX_INPUT_BYTES),
            Message::Probe(p) => check("padding", p.padding.len(), MAX_INPUT_BYTES),
            _ => Ok(()),
        }
    }
}
