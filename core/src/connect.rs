//! The password a device (or the coordinator) sends at MQTT CONNECT to prove it holds the key
//! behind its username.
//!
//! MQTT 3.1.1 has no challenge, so the proof is a signature over the username and the time:
//! `username` = the node id (32 hex characters), `password` = a [`ConnectToken`] as 208 hex
//! characters. A broker accepts it when the key hashes to the username, the signature verifies
//! and the time is within a window of its own clock. Replaying a token needs it intercepted
//! first, and works only within that window: use TLS on networks you do not trust.

use serde::Serialize;

use crate::id::{hex_decode, hex_into};
use crate::{Identity, NodeId, sign_message, verify_message};

/// A signed, timestamped proof of key possession for one username.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectToken {
    /// When it was made, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The ed25519 public key that signed it.
    pub public_key: [u8; 32],
    /// Signature over [`ConnectClaim`] (domain [`ConnectToken::TAG`]).
    pub signature: [u8; 64],
}

/// What a token's signature covers.
#[derive(Serialize)]
struct ConnectClaim<'a> {
    username: &'a str,
    at_ms: u64,
}

/// Why a broker refuses a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not 208 hex characters.
    Malformed,
    /// Made further from the broker's clock than the window allows (a replay, or a device
    /// clock that is wrong).
    Stale {
        /// Token time minus broker time, in milliseconds.
        skew_ms: i64,
    },
    /// The key does not hash to the node id given as username.
    WrongKey,
    /// The signature does not verify.
    BadSignature,
}

impl core::fmt::Display for TokenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Malformed => f.write_str("password is not a connect token (208 hex characters)"),
            Self::Stale { skew_ms } => write!(
                f,
                "connect token is {} s off the broker's clock (replayed, or the device clock is wrong)",
                skew_ms / 1000
            ),
            Self::WrongKey => f.write_str("the token's key does not belong to this node id"),
            Self::BadSignature => f.write_str("the token's signature does not verify"),
        }
    }
}

impl ConnectToken {
    /// Domain-separation tag of connect tokens.
    pub const TAG: &'static [u8] = b"ambient/connect/v1\0";
    /// Length of [`ConnectToken::to_hex`].
    pub const HEX_LEN: usize = 208;

    /// `identity` proves its key for `username` at `at_ms`.
    pub fn sign(identity: &Identity, username: &str, at_ms: u64) -> Self {
        let claim = ConnectClaim { username, at_ms };
        Self {
            at_ms,
            public_key: identity.public_key(),
            // Usernames are short (a node id, `coordinator`); a 1 KiB one signs as zeros and fails.
            signature: sign_message(identity, Self::TAG, &claim).unwrap_or([0; 64]),
        }
    }

    /// The password form: hex of `at_ms` (big-endian) ‖ public key ‖ signature.
    pub fn to_hex(&self) -> heapless::String<208> {
        let mut bytes = [0u8; 104];
        bytes[..8].copy_from_slice(&self.at_ms.to_be_bytes());
        bytes[8..40].copy_from_slice(&self.public_key);
        bytes[40..].copy_from_slice(&self.signature);
        hex_into(&bytes)
    }

    /// Parses [`ConnectToken::to_hex`].
    ///
    /// # Errors
    /// [`TokenError::Malformed`].
    pub fn from_hex(s: &str) -> Result<Self, TokenError> {
        let mut bytes = [0u8; 104];
        if !hex_decode(s, &mut bytes) {
            return Err(TokenError::Malformed);
        }
        let mut at = [0u8; 8];
        at.copy_from_slice(&bytes[..8]);
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(&bytes[8..40]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&bytes[40..]);
        Ok(Self {
            at_ms: u64::from_be_bytes(at),
            public_key,
            signature,
        })
    }

    /// Checks that the token was made within `window_ms` of `now_ms` and signed for
    /// `username` by [`ConnectToken::public_key`]. Who that key may be is the caller's
    /// decision: see [`ConnectToken::verify_node`] for devices.
    ///
    /// # Errors
    /// [`TokenError::Stale`] or [`TokenError::BadSignature`].
    pub fn verify(&self, username: &str, now_ms: u64, window_ms: u64) -> Result<(), TokenError> {
        let skew_ms = self.at_ms as i128 - now_ms as i128;
        if skew_ms.unsigned_abs() > u128::from(window_ms) {
            let skew_ms = skew_ms.clamp(i64::MIN.into(), i64::MAX.into()) as i64;
            return Err(TokenError::Stale { skew_ms });
        }
        let claim = ConnectClaim {
            username,
            at_ms: self.at_ms,
        };
        verify_message(&self.public_key, Self::TAG, &claim, &self.signature)
            .map_err(|_| TokenError::BadSignature)
    }

    /// [`ConnectToken::verify`] for a device: also checks that the key hashes to `node`.
    ///
    /// # Errors
    /// [`TokenError::WrongKey`], or those of [`ConnectToken::verify`].
    pub fn verify_node(
        &self,
        node: &NodeId,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<(), TokenError> {
        if NodeId::from_public_key(&self.public_key) != *node {
            return Err(TokenError::WrongKey);
        }
        self.verify(&node.to_hex(), now_ms, window_ms)
    }
}
