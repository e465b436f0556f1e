//! The schema and its migrations, versioned by `PRAGMA user_version`.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::{Fail, StoreError};

/// The schema version this build writes and reads (`PRAGMA user_version`).
///
/// A fresh file has version 0; [`Store::open`](super::Store::open) applies each migration in
/// turn.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`. Append only: a released
/// migration is never edited, because databases in the field have already run it.
const MIGRATIONS: &[&str] = &[V1, V2];

/// Version 1.
///
/// Integers are SQLite's signed 64-bit; timestamps are Unix milliseconds, amounts µcredits.
/// Digests and node ids are raw bytes (32 and 16), task ids their text.
const V1: &str = "
-- Wasm modules, content-addressed. The caller verified that hash = sha3-256(bytes).
CREATE TABLE modules (
    id    INTEGER PRIMARY KEY,
    hash  BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
    bytes BLOB NOT NULL
);

-- The task journal: one row per accepted submission, in submission order (seq). Only the small,
-- changing fields live here; the submission and the result are written once each, in their own
-- tables, so a status change rewrites a few dozen bytes instead of the whole submission.
CREATE TABLE tasks (
    seq          INTEGER PRIMARY KEY,
    task_id      TEXT NOT NULL UNIQUE,
    client       TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0 CHECK (attempts BETWEEN 0 AND 65535),
    submitted_ms INTEGER NOT NULL,
    finished_ms  INTEGER,
    CHECK ((status IN ('completed', 'failed')) = (finished_ms IS NOT NULL))
);
-- Serves listing by status and recovery (status IN ('pending', 'running')).
CREATE INDEX tasks_by_status ON tasks (status, seq);

-- The validated submission as JSON, enough to dispatch it again after a restart.
CREATE TABLE task_specs (
    task_seq  INTEGER PRIMARY KEY REFERENCES tasks (seq),
    spec_json TEXT NOT NULL
);

-- The result delivered to the client, as JSON; present exactly for finished tasks.
CREATE TABLE task_results (
    task_seq    INTEGER PRIMARY KEY REFERENCES tasks (seq),
    result_json TEXT NOT NULL
);

-- Every dispatch of a task: at-least-once, so the same (attempt, node) may be recorded twice.
CREATE TABLE dispatches (
    task_seq      INTEGER NOT NULL REFERENCES tasks (seq),
    attempt       INTEGER NOT NULL CHECK (attempt BETWEEN 0 AND 65535),
    node          BLOB NOT NULL CHECK (length(node) = 16),
    dispatched_ms INTEGER NOT NULL,
    PRIMARY KEY (task_seq, attempt, node)
) WITHOUT ROWID;

-- The ledger: one row per transfer of `amount` from debit_account to credit_account.
-- seq counts from 1 without gaps; hash = chain_hash(previous row's hash or 32 zero bytes,
-- canonical_entry_bytes(row)). UNIQUE (task_id, credit_account): a task pays a node once,
-- however often settlement is retried.
CREATE TABLE ledger (
    seq            INTEGER PRIMARY KEY,
    task_id        TEXT NOT NULL,
    debit_account  TEXT NOT NULL,
    credit_account TEXT NOT NULL,
    amount         INTEGER NOT NULL CHECK (amount >= 0),
    hash           BLOB NOT NULL CHECK (length(hash) = 32),
    UNIQUE (task_id, credit_account)
);
-- Append-only. The triggers stop mistakes; the hash chain catches whoever drops them.
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;

-- The latest registry snapshot, replaced whole; view_json is a NodeView as JSON.
CREATE TABLE nodes (
    node      BLOB PRIMARY KEY CHECK (length(node) = 16),
    view_json TEXT NOT NULL
) WITHOUT ROWID;

-- Single values: 'nodes_saved_ms'.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Version 2: the enrollment table (see `enrollment.rs`).
const V2: &str = "
-- Node keys waiting for the operator, and the operator's verdicts on keys. seq orders the
-- changes so the coordinator reads only what is new; announce is the node's last signed
-- announce frame, kept so an approval can admit the node at once.
CREATE TABLE enrollment (
    public_key BLOB PRIMARY KEY CHECK (length(public_key) = 32),
    node       BLOB NOT NULL CHECK (length(node) = 16),
    standing   TEXT NOT NULL CHECK (standing IN ('pending', 'approved', 'revoked')),
    announce   BLOB,
    changed_ms INTEGER NOT NULL,
    seq        INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX enrollment_by_seq ON enrollment (seq);
CREATE INDEX enrollment_by_node ON enrollment (node);
";

fn user_version(conn: &Connection) -> Result<i64, Fail> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

/// Brings the schema up to [`SCHEMA_VERSION`], one transaction per step.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found = user_version(conn).map_err(|e| e.at("read the schema version", path))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for version in found..SCHEMA_VERSION {
        let applied = migrate_step(conn, version).map_err(|e| e.at("migrate the schema", path))?;
        if applied {
            tracing::info!(path = %path.display(), from = version, to = version + 1, "migrated coordinator database");
        }
    }
    Ok(())
}

/// Applies `MIGRATIONS[version]` unless another process already has; true if it ran.
fn migrate_step(conn: &mut Connection, version: i64) -> Result<bool, Fail> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Re-read under the write lock: another process may have migrated meanwhile.
    if user_version(&tx)? != version {
        return Ok(false);
    }
    tx.execute_batch(MIGRATIONS[version as usize])?;
    tx.pragma_update(None, "user_version", version + 1)?;
    tx.commit()?;
    Ok(true)
}

/// Checks that a read-only connection sees exactly the current schema.
pub(super) fn check_readable(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let found = user_version(conn).map_err(|e| e.at("read the schema version", path))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found < SCHEMA_VERSION {
        return Err(StoreError::NeedsMigration {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn a_database_from_a_newer_build_is_refused_with_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let store = Store::open(&path).unwrap();
            store
                .conn
                .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { found, .. } if found == SCHEMA_VERSION + 1));
        assert!(matches!(
            Store::open_read_only(&path),
            Err(StoreError::TooNew { .. })
        ));
    }

    #[test]
    fn a_read_only_open_of_an_empty_file_asks_for_the_coordinator_to_migrate_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        std::fs::write(&path, b"").unwrap();
        let err = Store::open_read_only(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::NeedsMigration { found: 0, .. }),
            "{err:?}"
        );
    }
}
