//! What a node signs: receipts for tasks, and any message body under a domain tag.

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::id::sha3_256_parts;
use crate::{Digest, NodeId, ProofError, TaskId};

/// The sandbox limits a task runs under. Seed defaults: 512 MiB, 30 s, 10^10 fuel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Maximum linear memory plus tables, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock budget for the run, in milliseconds (not deterministic, a backstop).
    pub timeout_ms: u64,
    /// Fuel budget: roughly one unit per WASM instruction; deterministic across nodes.
    pub fuel: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 512 << 20,
            timeout_ms: 30_000,
            fuel: 10_000_000_000,
        }
    }
}

/// The WASM engine that ran a task. Append-only: the variant index is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Engine {
    /// wasmtime, compiling with Cranelift (x86_64, aarch64, riscv64, s390x).
    Wasmtime,
    /// WasmEdge.
    WasmEdge,
    /// wasmtime on its Pulley interpreter, where Cranelift has no backend (32-bit ARM). The same
    /// runtime and semantics as [`Engine::Wasmtime`], and the same fuel for the same run;
    /// slower, since the code is interpreted.
    WasmtimePulley,
}

impl Engine {
    /// Every engine, in wire order.
    pub const ALL: [Engine; 3] = [Self::Wasmtime, Self::WasmEdge, Self::WasmtimePulley];

    /// The engine's name as shown to users and used in node labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wasmtime => "wasmtime",
            Self::WasmEdge => "wasmedge",
            Self::WasmtimePulley => "wasmtime-pulley",
        }
    }

    /// The engine named `name` ([`Engine::as_str`]).
    pub fn from_name(name: &str) -> Option<Engine> {
        Self::ALL.into_iter().find(|e| e.as_str() == name)
    }

    /// Whether a node running this engine can take a task that asks for `wanted`: the same
    /// engine, or Pulley for `wasmtime` (the same runtime, interpreted).
    ///
    /// ```
    /// use ambient_core::Engine;
    /// assert!(Engine::WasmtimePulley.satisfies(Engine::Wasmtime));
    /// assert!(!Engine::Wasmtime.satisfies(Engine::WasmtimePulley));
    /// assert!(!Engine::WasmEdge.satisfies(Engine::Wasmtime));
    /// ```
    pub fn satisfies(self, wanted: Engine) -> bool {
        self == wanted || (self == Self::WasmtimePulley && wanted == Self::Wasmtime)
    }
}

/// How a run ended. Append-only: the variant index is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Exit {
    /// Returned normally; the output is the task's result.
    Ok,
    /// Trapped (unreachable, out-of-bounds access, division by zero, ...).
    Trapped,
    /// Ran out of fuel.
    OutOfFuel,
    /// Hit the wall-clock limit.
    TimedOut,
    /// Tried to grow memory beyond the limit.
    OutOfMemory,
    /// The module was refused before running: invalid, too large, forbidden imports, no such entry.
    Rejected,
    /// A WASI program ended with `proc_exit` and this non-zero status (status 0 is [`Exit::Ok`]).
    ExitStatus(i32),
}

impl Exit {
    /// Short lowercase name, as used in JSON results.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Trapped => "trapped",
            Self::OutOfFuel => "out_of_fuel",
            Self::TimedOut => "timed_out",
            Self::OutOfMemory => "out_of_memory",
            Self::Rejected => "rejected",
            Self::ExitStatus(_) => "exit_status",
        }
    }

    /// The program's exit status, for [`Exit::ExitStatus`].
    pub fn status(self) -> Option<i32> {
        match self {
            Self::ExitStatus(status) => Some(status),
            _ => None,
        }
    }
}

/// Evidence of one execution: what ran, on what, with what result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The task.
    pub task_id: TaskId,
    /// Dispatch attempt, from 1.
    pub attempt: u16,
    /// The node that ran it.
    pub node: NodeId,
    /// sha3-256 of the module bytes.
    pub module: Digest,
    /// sha3-256 of the input bytes.
    pub input: Digest,
    /// sha3-256 of the output bytes (empty output when the run did not end `Ok`).
    pub output: Digest,
    /// Fuel consumed.
    pub fuel_used: u64,
    /// Limits the run was held to.
    pub limits: Limits,
    /// Engine used.
    pub engine: Engine,
    /// How the run ended.
    pub exit: Exit,
}

impl Receipt {
    /// Domain-separation tag of receipt commitments.
    pub const TAG: &'static [u8] = b"ambient/receipt/v1\0";

    /// The commitment the node signs: sha3-256 over [`Receipt::TAG`] and the canonical
    /// (postcard) encoding of the receipt.
    pub fn commitment(&self) -> Digest {
        let mut buf = [0u8; 256];
        // A receipt is at most ~230 bytes (64-byte task id, fixed-size fields), so it fits.
        let bytes = postcard::to_slice(self, &mut buf)
            .map(|b| &*b)
            .unwrap_or(&[]);
        sha3_256_parts(&[Self::TAG, bytes])
    }

    /// Signs the commitment.
    pub fn sign(self, identity: &Identity) -> SignedReceipt {
        let signature = identity.sign_digest(&self.commitment());
        SignedReceipt {
            receipt: self,
            signature,
        }
    }
}

/// A receipt and the node's ed25519 signature over its commitment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// The receipt.
    pub receipt: Receipt,
    /// ed25519 signature over `receipt.commitment()`.
    #[serde(with = "serde_sig")]
    pub signature: [u8; 64],
}

impl SignedReceipt {
    /// Checks the signature with strict verification under `public_key`.
    ///
    /// # Errors
    /// [`ProofError::BadPublicKey`] or [`ProofError::BadSignature`].
    pub fn verify_signature(&self, public_key: &[u8; 32]) -> Result<(), ProofError> {
        self.verify_signature_by(&PublicKey::from_bytes(public_key)?)
    }

    /// [`SignedReceipt::verify_signature`] with a key already decompressed.
    ///
    /// # Errors
    /// [`ProofError::BadSignature`].
    pub fn verify_signature_by(&self, key: &PublicKey) -> Result<(), ProofError> {
        verify_digest(key, &self.receipt.commitment(), &self.signature)
    }
}

/// An ed25519 public key, decompressed once. Checking a signature from bytes starts by
/// decompressing the key's curve point, about a tenth of the check; a verifier that meets
/// the same signer again and again keeps this instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Decompresses `bytes`.
    ///
    /// # Errors
    /// [`ProofError::BadPublicKey`] when they are not a point on the curve.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, ProofError> {
        VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| ProofError::BadPublicKey)
    }

    /// The 32 bytes it was made from.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The 32 bytes it was made from, borrowed.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }
}

/// A node's signing identity (ed25519).
pub struct Identity {
    key: SigningKey,
}

impl Identity {
    /// Builds the identity from its 32-byte secret.
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(secret),
        }
    }

    /// The 32-byte secret, for storing in the state directory.
    pub fn to_secret(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The node id derived from the public key.
    pub fn node_id(&self) -> NodeId {
        NodeId::from_public_key(&self.public_key())
    }

    fn sign_digest(&self, digest: &Digest) -> [u8; 64] {
        self.key.sign(&digest.0).to_bytes()
    }
}

fn verify_digest(key: &PublicKey, digest: &Digest, signature: &[u8; 64]) -> Result<(), ProofError> {
    let sig = ed25519_dalek::Signature::from_bytes(signature);
    key.0
        .verify_strict(&digest.0, &sig)
        .map_err(|_| ProofError::BadSignature)
}

/// Largest message body [`sign_message`] accepts, in bytes of postcard encoding.
const MAX_SIGNED_BODY: usize = 1024;

pub(crate) fn message_digest<T: Serialize>(domain: &[u8], body: &T) -> Result<Digest, ProofError> {
    let mut buf = [0u8; MAX_SIGNED_BODY];
    let bytes = postcard::to_slice(body, &mut buf).map_err(|_| ProofError::Encoding)?;
    Ok(sha3_256_parts(&[domain, bytes]))
}

/// Signs sha3-256(`domain` ‖ postcard(`body`)); used for announces and telemetry.
///
/// # Errors
/// [`ProofError::Encoding`] if the body encodes to more than 1 KiB.
pub fn sign_message<T: Serialize>(
    identity: &Identity,
    domain: &[u8],
    body: &T,
) -> Result<[u8; 64], ProofError> {
    Ok(identity.sign_digest(&message_digest(domain, body)?))
}

/// Verifies a signature made by [`sign_message`].
///
/// # Errors
/// [`ProofError`] when the key, encoding or signature is bad.
pub fn verify_message<T: Serialize>(
    public_key: &[u8; 32],
    domain: &[u8],
    body: &T,
    signature: &[u8; 64],
) -> Result<(), ProofError> {
    verify_message_by(&PublicKey::from_bytes(public_key)?, domain, body, signature)
}

/// [`verify_message`] with a key already decompressed.
///
/// # Errors
/// [`ProofError`] when the encoding or signature is bad.
pub fn verify_message_by<T: Serialize>(
    key: &PublicKey,
    domain: &[u8],
    body: &T,
    signature: &[u8; 64],
) -> Result<(), ProofError> {
    verify_digest(key, &message_digest(domain, body)?, signature)
}

/// One link of the ledger's hash chain: sha3-256(tag ‖ previous ‖ entry).
///
/// The first entry uses an all-zero `previous`. Changing any entry changes every later hash.
pub fn chain_hash(previous: &Digest, entry: &[u8]) -> Digest {
    sha3_256_parts(&[b"ambient/ledger/v1\0", &previous.0, entry])
}

/// serde for `[u8; 64]` (serde derives arrays only up to 32 elements).
pub(crate) mod serde_sig {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::ser::SerializeTuple;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(64)?;
        for b in sig {
            t.serialize_element(b)?;
        }
        t.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = [u8; 64];
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<[u8; 64], A::Error> {
                let mut out = [0u8; 64];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                Ok(out)
            }
        }
        d.deserialize_tuple(64, V)
    }
}
