use core::fmt;

/// Why bytes from the wire could not be turned into a [`crate::Message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame is longer than [`crate::MAX_FRAME_BYTES`]; it was rejected before decoding.
    FrameTooLarge {
        /// Length of the frame in bytes.
        len: usize,
    },
    /// The envelope names a protocol version this build does not speak.
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The bytes are not a valid postcard encoding of a message.
    Malformed,
    /// Decoding succeeded but bytes were left over after the message.
    TrailingBytes,
    /// A byte field is longer than its named maximum.
    FieldTooLarge {
        /// Which field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The maximum allowed.
        max: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FrameTooLarge { len } => write!(
                f,
                "frame of {len} bytes exceeds the {} byte limit",
                crate::MAX_FRAME_BYTES
            ),
            Self::UnsupportedVersion { found } => write!(
                f,
                "protocol version {found} is not supported (this build speaks {})",
                crate::PROTOCOL_VERSION
            ),
            Self::Malformed => f.write_str("frame is not a valid ambient message"),
            Self::TrailingBytes => f.write_str("frame has bytes after the message"),
            Self::FieldTooLarge { field, len, max } => {
                write!(f, "{field} is {len} bytes, more than the {max} byte limit")
            }
        }
    }
}

/// Why a key, signature or signed message was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProofError {
    /// The 32 bytes are not a valid ed25519 public key.
    BadPublicKey,
    /// The signature does not verify under the key (strict verification).
    BadSignature,
    /// The message does not fit the signing buffer.
    Encoding,
}

impl fmt::Display for ProofError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadPublicKey => f.write_str("public key is not a valid ed25519 point"),
            Self::BadSignature => f.write_str("signature does not verify"),
            Self::Encoding => f.write_str("message could not be encoded for signing"),
        }
    }
}

/// Why a receipt was not accepted as evidence for a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    /// The signature or key is invalid.
    Proof(ProofError),
    /// The receipt names a different task or attempt than the one assigned.
    WrongTask,
    /// The receipt was signed by a different node than the one assigned.
    WrongNode,
    /// The module hash differs from the task's module.
    ModuleMismatch,
    /// The input hash differs from the hash of the task's input.
    InputMismatch,
    /// The output hash differs from the hash of the output delivered with the receipt.
    OutputMismatch,
    /// The receipt claims more fuel than the task allowed.
    FuelOverLimit {
        /// Fuel claimed.
        used: u64,
        /// Fuel allowed.
        limit: u64,
    },
    /// The receipt's limits differ from the limits the task was assigned with.
    LimitsMismatch,
}

impl VerifyError {
    /// Whether the node itself vouched for what is wrong: its key signed a receipt for this
    /// very task and attempt whose claims are false. Only then is the error evidence against
    /// the node. A bad signature, a receipt for another attempt (a replay) or output bytes that
    /// do not match a genuine receipt could have been sent by anyone who reaches the broker.
    pub fn is_attributable(&self) -> bool {
        match self {
            Self::Proof(_) | Self::WrongTask | Self::WrongNode | Self::OutputMismatch => false,
            Self::ModuleMismatch
            | Self::InputMismatch
            | Self::FuelOverLimit { .. }
            | Self::LimitsMismatch => true,
        }
    }
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Proof(e) => write!(f, "receipt signature: {e}"),
            Self::WrongTask => f.write_str("receipt is for another task or attempt"),
            Self::WrongNode => f.write_str("receipt is signed by another node"),
            Self::ModuleMismatch => f.write_str("receipt's module hash differs from the task's"),
            Self::InputMismatch => f.write_str("receipt's input hash differs from the task's"),
            Self::OutputMismatch => f.write_str("receipt's output hash differs from the output"),
            Self::FuelOverLimit { used, limit } => {
                write!(
                    f,
                    "receipt claims {used} fuel, over the task's limit of {limit}"
                )
            }
            Self::LimitsMismatch => f.write_str("receipt's limits differ from the task's"),
        }
    }
}

impl From<ProofError> for VerifyError {
    fn from(e: ProofError) -> Self {
        Self::Proof(e)
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DecodeError {}
#[cfg(feature = "std")]
impl std::error::Error for ProofError {}
#[cfg(feature = "std")]
impl std::error::Error for VerifyError {}
