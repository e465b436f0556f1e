//! Enrollment verdicts: which node keys the operator approved or revoked, and which wait.
//!
//! Two writers share the `enrollment` table, each through its own connection:
//!
//! - the coordinator journals a key as `pending` ([`Batch::record_pending`]) when a node whose
//!   key is not on the allowlist proves possession of it with a validly signed announce;
//! - `ambient nodes approve` / `revoke` record the operator's verdict ([`Store::decide`]).
//!
//! Every verdict takes the next `seq`, so the coordinator picks up what changed with
//! [`Store::decisions_since`], after [`Store::data_version`] says another connection wrote.
//! Pending keys are bounded to the [`MAX_PENDING`] most recent; verdicts are the operator's and
//! are kept.

use ambient_core::NodeId;
use rusqlite::OptionalExtension;
use serde::Serialize;

use super::{Batch, Fail, Store, StoreError, from_sql_int, to_sql_int};

/// Most keys kept waiting for a verdict; the oldest beyond it are dropped (a node announces
/// again when it reconnects, and a key can always be approved directly).
pub const MAX_PENDING: usize = 1_000;

/// Where a node's key stands with the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    /// Announced, validly signed, not on the allowlist: waiting for `ambient nodes approve`.
    Pending,
    /// Admitted, in addition to `[enrollment] allow`.
    Approved,
    /// Refused and removed from the pool, whatever the enrollment mode or the allowlist says.
    Revoked,
}

impl Standing {
    /// Its name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Pending => "pending",
            Standing::Approved => "approved",
            Standing::Revoked => "revoked",
        }
    }

    fn parse(s: &str) -> Result<Self, Fail> {
        match s {
            "pending" => Ok(Standing::Pending),
            "approved" => Ok(Standing::Approved),
            "revoked" => Ok(Standing::Revoked),
            other => Err(Fail::Corrupt(format!(
                "unknown enrollment standing {other:?}"
            ))),
        }
    }
}

/// Which node a verdict is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A node by id: it must have announced itself (it is pending or has a verdict).
    Node(NodeId),
    /// A node by its ed25519 public key: also one that has never announced itself.
    Key([u8; 32]),
}

impl Subject {
    /// Parses a node id (32 hex characters) or a public key (64 hex characters), as
    /// `ambient-agent --print-node-id` prints them.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        match s.len() {
            32 => NodeId::from_hex(&s.to_ascii_lowercase()).map(Subject::Node),
            64 => {
                let mut key = [0u8; 32];
                hex::decode_to_slice(s, &mut key).ok()?;
                Some(Subject::Key(key))
            }
            _ => None,
        }
    }
}

/// One key in the enrollment table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enrolled {
    /// The node id derived from the key.
    pub node: NodeId,
    /// The node's ed25519 public key.
    #[serde(serialize_with = "hex_key")]
    pub public_key: [u8; 32],
    /// Where it stands.
    pub standing: Standing,
    /// When it last changed, in Unix milliseconds.
    pub changed_ms: u64,
    /// The node's last signed announce (an envelope frame), if it ever sent one.
    #[serde(skip)]
    pub announce: Option<Vec<u8>>,
    /// Order of the change: increases with every change.
    #[serde(skip)]
    pub seq: i64,
}

fn hex_key<S: serde::Serializer>(key: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(key))
}

const COLUMNS: &str = "node, public_key, standing, changed_ms, announce, seq";

/// A row as SQLite returns it: node, public key, standing, changed_ms, announce, seq.
type RawRow = (Vec<u8>, [u8; 32], String, i64, Option<Vec<u8>>, i64);

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn enrolled(
    (node, public_key, standing, changed_ms, announce, seq): RawRow,
) -> Result<Enrolled, Fail> {
    let node: [u8; 16] = node
        .try_into()
        .map_err(|_| Fail::Corrupt("an enrollment node id is not 16 bytes".into()))?;
    Ok(Enrolled {
        node: NodeId(node),
        public_key,
        standing: Standing::parse(&standing)?,
        changed_ms: from_sql_int(changed_ms, "changed_ms")?,
        announce,
        seq,
    })
}

impl Batch<'_> {
    /// Journals `public_key` as waiting for a verdict, with the node's signed announce
    /// (`frame`), at `at_ms`. A key that already has a verdict keeps it; a pending one gets the
    /// newer announce. Keeps the [`MAX_PENDING`] most recent pending keys.
    ///
    /// # Errors
    ///
    /// [`StoreError::OutOfRange`], [`StoreError::Sqlite`].
    pub fn record_pending(
        &mut self,
        public_key: &[u8; 32],
        frame: &[u8],
        at_ms: u64,
    ) -> Result<(), StoreError> {
        self.run("record a pending node", |b| {
            let at = to_sql_int(at_ms, "at_ms")?;
            let node = NodeId::from_public_key(public_key);
            b.tx.prepare_cached(
                "INSERT INTO enrollment (public_key, node, standing, announce, changed_ms, seq)
                 VALUES (?1, ?2, 'pending', ?3, ?4, (SELECT COALESCE(MAX(seq), 0) + 1 FROM enrollment))
                 ON CONFLICT (public_key) DO UPDATE SET announce = excluded.announce,
                     changed_ms = excluded.changed_ms
                 WHERE standing = 'pending'",
            )?
            .execute((public_key, node.0, frame, at))?;
            b.tx.prepare_cached(
                "DELETE FROM enrollment WHERE standing = 'pending' AND public_key NOT IN
                 (SELECT public_key FROM enrollment WHERE standing = 'pending'
                  ORDER BY changed_ms DESC, seq DESC LIMIT ?1)",
            )?
            .execute([MAX_PENDING as i64])?;
            Ok(())
        })
    }
}

impl Store {
    /// Records the operator's verdict, `standing` ([`Standing::Approved`] or [`Standing::Revoked`]) on
    /// `subject` at `at_ms`, and returns the row as it now stands. A running coordinator applies
    /// it within a tick.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotEnrolled`] for a node id the table does not know (it never announced
    /// itself: approve its public key instead); [`StoreError::Sqlite`].
    pub fn decide(
        &mut self,
        subject: Subject,
        standing: Standing,
        at_ms: u64,
    ) -> Result<Enrolled, StoreError> {
        self.write(|b| {
            b.run("record an enrollment verdict", |b| {
                let at = to_sql_int(at_ms, "at_ms")?;
                let key: [u8; 32] = match subject {
                    Subject::Key(key) => key,
                    Subject::Node(node) => {
                        b.tx.prepare_cached("SELECT public_key FROM enrollment WHERE node = ?1")?
                            .query_row([node.0], |r| r.get(0))
                            .optional()?
                            .ok_or(Fail::Store(StoreError::NotEnrolled { node }))?
                    }
                };
                let node = NodeId::from_public_key(&key);
                b.tx.prepare_cached(
                    "INSERT INTO enrollment (public_key, node, standing, changed_ms, seq)
                     VALUES (?1, ?2, ?3, ?4, (SELECT COALESCE(MAX(seq), 0) + 1 FROM enrollment))
                     ON CONFLICT (public_key) DO UPDATE SET standing = excluded.standing,
                         changed_ms = excluded.changed_ms, seq = excluded.seq",
                )?
                .execute((key, node.0, standing.as_str(), at))?;
                let found =
                    b.tx.prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM enrollment WHERE public_key = ?1"
                    ))?
                    .query_row([key], row)?;
                enrolled(found)
            })
        })
    }

    /// Every key in the table, pending first, then by node id.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]; [`StoreError::Corrupt`] for a malformed row.
    pub fn enrollment(&self) -> Result<Vec<Enrolled>, StoreError> {
        self.read("read the enrollment table", |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM enrollment ORDER BY standing <> 'pending', node"
            ))?;
            let rows = stmt.query_map([], row)?;
            rows.map(|r| enrolled(r?)).collect()
        })
    }

    /// The verdicts (not pending keys) recorded after `seq`, oldest first.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]; [`StoreError::Corrupt`] for a malformed row.
    pub fn decisions_since(&self, seq: i64) -> Result<Vec<Enrolled>, StoreError> {
        self.read("read enrollment verdicts", |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM enrollment WHERE seq > ?1 AND standing <> 'pending' ORDER BY seq"
            ))?;
            let rows = stmt.query_map([seq], row)?;
            rows.map(|r| enrolled(r?)).collect()
        })
    }

    /// SQLite's `data_version`: it changes when another connection commits to the file, so a
    /// poll that finds it unchanged needs to read nothing.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn data_version(&self) -> Result<i64, StoreError> {
        self.read("read the data version", |conn| {
            Ok(conn.pragma_query_value(None, "data_version", |r| r.get(0))?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
        (dir, store)
    }

    fn pend(store: &mut Store, key: [u8; 32], at_ms: u64) {
        let mut b = store.batch().unwrap();
        b.record_pending(&key, b"frame", at_ms).unwrap();
        b.commit().unwrap();
    }

    #[test]
    fn a_pending_node_is_approved_by_its_id_and_the_verdict_is_read_once() {
        let (_dir, mut store) = store();
        let key = [7; 32];
        let node = NodeId::from_public_key(&key);
        pend(&mut store, key, 10);
        assert!(
            store.decisions_since(0).unwrap().is_empty(),
            "pending is no verdict"
        );

        let row = store
            .decide(Subject::Node(node), Standing::Approved, 20)
            .unwrap();
        assert_eq!((row.node, row.standing), (node, Standing::Approved));
        assert_eq!(
            row.announce.as_deref(),
            Some(&b"frame"[..]),
            "the announce is kept"
        );
        let seen = store.decisions_since(0).unwrap();
        assert_eq!(seen.len(), 1);
        assert!(store.decisions_since(seen[0].seq).unwrap().is_empty());

        // A later announce does not turn the verdict back into pending.
        pend(&mut store, key, 30);
        assert_eq!(store.enrollment().unwrap()[0].standing, Standing::Approved);
        let revoked = store
            .decide(Subject::Key(key), Standing::Revoked, 40)
            .unwrap();
        assert!(revoked.seq > seen[0].seq, "a new verdict is read again");
        assert_eq!(store.decisions_since(seen[0].seq).unwrap(), [revoked]);
    }

    #[test]
    fn a_node_id_never_seen_cannot_be_decided_but_its_key_can() {
        let (_dir, mut store) = store();
        let key = [9; 32];
        let node = NodeId::from_public_key(&key);
        assert!(matches!(
            store.decide(Subject::Node(node), Standing::Approved, 1),
            Err(StoreError::NotEnrolled { node: n }) if n == node
        ));
        let row = store
            .decide(Subject::Key(key), Standing::Approved, 1)
            .unwrap();
        assert_eq!((row.node, row.announce), (node, None));
    }

    #[test]
    fn pending_keys_are_bounded_to_the_most_recent() {
        let (_dir, mut store) = store();
        let mut b = store.batch().unwrap();
        for i in 0..(MAX_PENDING as u64 + 5) {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&i.to_be_bytes());
            b.record_pending(&key, b"f", i).unwrap();
        }
        b.commit().unwrap();
        let rows = store.enrollment().unwrap();
        assert_eq!(rows.len(), MAX_PENDING);
        assert!(
            rows.iter().all(|r| r.changed_ms >= 5),
            "the oldest went first"
        );
    }

    #[test]
    fn subjects_parse_from_ids_and_keys_and_nothing_else() {
        let key = [0xab; 32];
        let node = NodeId::from_public_key(&key);
        assert_eq!(Subject::parse(&node.to_hex()), Some(Subject::Node(node)));
        assert_eq!(Subject::parse(&hex::encode(key)), Some(Subject::Key(key)));
        assert_eq!(Subject::parse("abc"), None);
        assert_eq!(Subject::parse(&"z".repeat(32)), None);
    }

    #[test]
    fn another_connections_write_changes_the_data_version() {
        let (dir, mut store) = store();
        let reader = Store::open(&dir.path().join("c.db")).unwrap();
        let before = reader.data_version().unwrap();
        assert_eq!(reader.data_version().unwrap(), before);
        store
            .decide(Subject::Key([1; 32]), Standing::Revoked, 1)
            .unwrap();
        assert_ne!(reader.data_version().unwrap(), before);
    }
}
