use core::fmt;
use serde::{Deserialize, Serialize};
use sha3::Digest as _;

/// A sha3-256 digest: of a module, an input, an output, a receipt or a ledger entry.
///
/// On the wire (postcard) it is 32 raw bytes; in human-readable formats (JSON) a hex string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

/// The sha3-256 of `bytes`, the same value `openssl dgst -sha3-256` prints.
pub fn sha3_256(bytes: &[u8]) -> Digest {
    Digest(sha3::Sha3_256::digest(bytes).into())
}

/// sha3-256 over several parts, without concatenating them first.
pub(crate) fn sha3_256_parts(parts: &[&[u8]]) -> Digest {
    let mut h = sha3::Sha3_256::new();
    for p in parts {
        h.update(p);
    }
    Digest(h.finalize().into())
}

impl Digest {
    /// The digest as 64 lowercase hex characters.
    pub fn to_hex(&self) -> heapless::String<64> {
        hex_into(&self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex_decode(s, &mut out).then_some(Self(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

/// A node's identity: the first 16 bytes of a domain-separated sha3-256 of its ed25519 public key.
///
/// Shown and used in topics as 32 lowercase hex characters. Because it derives from the key,
/// a node cannot claim another's id without its private key.
///
/// On the wire (postcard) it is 16 raw bytes; in human-readable formats (JSON) a hex string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    /// Domain-separation tag for node ids.
    const TAG: &'static [u8] = b"ambient/node-id/v1\0";

    /// Derives the node id from an ed25519 public key.
    pub fn from_public_key(public_key: &[u8; 32]) -> Self {
        let d = sha3_256_parts(&[Self::TAG, public_key]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&d.0[..16]);
        Self(id)
    }

    /// The id as 32 lowercase hex characters.
    pub fn to_hex(&self) -> heapless::String<32> {
        hex_into(&self.0)
    }

    /// Parses 32 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 16];
        hex_decode(s, &mut out).then_some(Self(out))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.to_hex())
    }
}

/// A task's id: 1 to 64 characters from `[A-Za-z0-9._-]`, chosen by the client or the coordinator.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId(heapless::String<64>);

impl TaskId {
    /// Maximum length in bytes.
    pub const MAX_LEN: usize = 64;

    /// Validates `s` as a task id; `None` if it is empty, too long or has other characters.
    pub fn new(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return None;
        }
        let mut out = heapless::String::new();
        out.push_str(s).ok()?;
        Some(Self(out))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether decoding produced a valid id (postcard checks the length, not the alphabet).
    pub(crate) fn is_valid(&self) -> bool {
        Self::new(&self.0).is_some()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", self.0)
    }
}

pub(crate) fn hex_into<const N: usize>(bytes: &[u8]) -> heapless::String<N> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = heapless::String::new();
    for b in bytes {
        // Capacity N is exactly twice the byte length at every call site, so pushes cannot fail.
        let _ = s.push(HEX[(b >> 4) as usize] as char);
        let _ = s.push(HEX[(b & 0xf) as usize] as char);
    }
    s
}

pub(crate) fn hex_decode(s: &str, out: &mut [u8]) -> bool {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if s.len() != out.len() * 2 {
        return false;
    }
    for (i, pair) in s.chunks_exact(2).enumerate() {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(h), Some(l)) => out[i] = (h << 4) | l,
            _ => return false,
        }
    }
    true
}

/// Serde for byte-array ids: raw bytes for binary formats, hex text for human-readable ones.
macro_rules! hex_serde {
    ($t:ident, $n:expr) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_hex())
                } else {
                    s.serialize_newtype_struct(stringify!($t), &self.0)
                }
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Hex;
                impl serde::de::Visitor<'_> for Hex {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "{} hex characters", $n * 2)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$t, E> {
                        $t::from_hex(v)
                            .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
                    }
                }
                if d.is_human_readable() {
                    d.deserialize_str(Hex)
                } else {
                    <[u8; $n]>::deserialize(d).map($t)
                }
            }
        }
    };
}

hex_serde!(Digest, 32);
hex_serde!(NodeId, 16);
