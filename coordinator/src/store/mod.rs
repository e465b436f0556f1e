//! The SQLite journal, module store, node snapshot and ledger.
//!
//! One file on the gateway holds everything the coordinator must not forget across a restart:
//!
//! - modules, content-addressed by sha3-256 ([`Store::put_module`]);
//! - the task journal: every accepted submission, its dispatches and its outcome
//!   ([`Store::insert_tasks`], [`Store::record_dispatch`], [`Store::finish_task`],
//!   [`Store::unfinished_tasks`] for recovery);
//! - the ledger: append-only, double-entry, hash-chained with [`ambient_core::chain_hash`],
//!   credited once per task ([`Store::settle`], [`Store::verify_ledger`]);
//! - a snapshot of the node registry for `ambient nodes` ([`Store::save_nodes`]);
//! - enrollment: keys waiting for approval and the operator's verdicts ([`Store::decide`]).
//!
//! The coordinator's dispatcher does not call these methods: it returns its writes as [`Op`]s,
//! and the service applies each loop turn's operations with [`Store::apply`] (group commit).
//!
//! # Durability and throughput
//!
//! The database runs in WAL mode with `synchronous = FULL`: when a write method returns `Ok`,
//! the change has been fsynced and survives a power cut, so the coordinator may acknowledge it.
//! Every commit costs one fsync, which is what limits write throughput (an SD card manages a few
//! hundred per second). Writes that happen together should therefore share a transaction: the
//! slice-taking methods ([`Store::insert_tasks`], [`Store::finish_tasks`],
//! [`Store::record_dispatches`], [`Store::settle_many`]) commit once per call, and a [`Batch`]
//! mixes any of them under a single commit.
//!
//! The coordinator itself goes one step further: after [`Store::defer_sync`] its commits are
//! written without an fsync, and a [`WalSync`] handle on another thread fsyncs the log once for
//! every commit written meanwhile, before anything that depends on them is acknowledged. The
//! statements above about write methods hold for every other writer.
//!
//! # Sharing the file
//!
//! The coordinator holds the writing [`Store`]; CLI commands open the same file with
//! [`Store::open_read_only`] while it runs, except `ambient nodes approve`/`revoke`, which
//! write one verdict each ([`Store::decide`]). WAL mode lets readers proceed during a write, and both
//! sides wait up to [`BUSY_TIMEOUT`] for a lock rather than failing at once.

mod batch;
mod enrollment;
mod error;
mod journal;
mod ledger;
mod modules;
mod nodes;
mod schema;
mod sync;
mod tasks;
#[cfg(test)]
mod throughput;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use error::Fail;

pub use batch::Batch;
pub use enrollment::{Enrolled, MAX_PENDING, Standing, Subject};
pub use error::{StoreError, UnknownStatus};
pub use journal::{Known, Op};
pub use ledger::{
    Balance, LedgerCheck, LedgerEntry, Payout, Settlement, canonical_entry_bytes, client_account,
    node_account,
};
pub use schema::SCHEMA_VERSION;
pub use sync::WalSync;
pub use tasks::{Finish, Inserted, JournaledTask, NewTask, TaskRow, TaskStatus};

/// How long a connection waits for another connection's lock before giving up: 5 seconds.
///
/// Long enough to ride out a checkpoint or a large batch, short enough that a stuck writer
/// surfaces as an error rather than a hung CLI.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many prepared statements each connection keeps: more than the store uses, so the hot
/// statements are never re-parsed.
const STATEMENT_CACHE: usize = 64;

/// The coordinator's database: one SQLite file holding modules, the task journal, the ledger and
/// the node snapshot.
///
/// Not `Sync`: one thread (the coordinator's store task) owns it. Open a second, read-only
/// `Store` to read from elsewhere.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens the database at `path` for reading and writing, creating the file and its parent
    /// directories if needed and bringing the schema up to [`SCHEMA_VERSION`].
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] if the directory cannot be created, [`StoreError::TooNew`] if the file
    /// was written by a newer build, [`StoreError::Sqlite`] if SQLite cannot open or migrate it
    /// (for example because it is not a database).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut store = Self::connect(path, flags)?;
        store
            .configure_writer()
            .map_err(|e| e.at("configure the database", path))?;
        schema::migrate(&mut store.conn, path)?;
        tracing::debug!(path = %path.display(), version = SCHEMA_VERSION, "opened coordinator database");
        Ok(store)
    }

    /// Opens an existing database for reading only, alongside a running coordinator.
    ///
    /// Write methods on the returned store fail with [`StoreError::Sqlite`].
    ///
    /// # Errors
    ///
    /// [`StoreError::Missing`] if there is no file at `path` (the coordinator has not run with
    /// this data directory), [`StoreError::NeedsMigration`] or [`StoreError::TooNew`] if its
    /// schema is not the one this build reads, [`StoreError::Sqlite`] if SQLite cannot read it.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let store = Self::connect(path, flags)?;
        store
            .conn
            .pragma_update(None, "query_only", true)
            .map_err(|e| Fail::from(e).at("configure the database", path))?;
        schema::check_readable(&store.conn, path)?;
        Ok(store)
    }

    /// The file this store reads and writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a [`Batch`]: several writes of any kind, committed (and fsynced) once.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] if the write lock cannot be taken within [`BUSY_TIMEOUT`].
    pub fn batch(&mut self) -> Result<Batch<'_>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Fail::from(e).at("begin a write", &self.path))?;
        Ok(Batch::new(tx, &self.path))
    }

    /// From now on, commits on this connection are written but not fsynced; they are durable
    /// once [`WalSync::sync`] on the returned handle has returned after them. For a writer that
    /// makes its commits durable on another thread (the coordinator's commit pipeline); every
    /// other writer keeps `synchronous = FULL`. See [`WalSync`].
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] if the setting cannot be changed, [`StoreError::Sync`] if the
    /// write-ahead log cannot be opened.
    pub fn defer_sync(&mut self) -> Result<WalSync, StoreError> {
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| Fail::from(e).at("configure the database", &self.path))?;
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        WalSync::open(wal.into())
    }

    /// Runs `f` in one batch and commits it; on error nothing `f` wrote is kept.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&mut Batch<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut batch = self.batch()?;
        let out = f(&mut batch)?;
        batch.commit()?;
        Ok(out)
    }

    /// Runs a read `f`, naming `op` and the file in any error.
    fn read<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Connection) -> Result<T, Fail>,
    ) -> Result<T, StoreError> {
        f(&self.conn).map_err(|e| e.at(op, &self.path))
    }

    fn connect(path: &Path, flags: OpenFlags) -> Result<Store, StoreError> {
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|e| Fail::from(e).at("open the database", path))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Plans that never depend on a bound value. The bundled SQLite is built with STAT4,
        // which otherwise marks statements whose plan might (such as the lookup of a task by
        // id) to be prepared again at every run: a sixth of the dispatcher thread's time.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(|e| Fail::from(e).at("configure the query planner", path))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| Fail::from(e).at("set the busy timeout", path))?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn configure_writer(&self) -> Result<(), Fail> {
        let mode: String =
            self.conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            // SQLite keeps the old mode silently when WAL is impossible (some network filesystems).
            return Err(Fail::Corrupt(format!(
                "cannot switch to WAL mode (journal_mode is {mode}); keep the data directory on a local disk"
            )));
        }
        // FULL: in WAL mode NORMAL may lose the last commits on power loss; every commit here is
        // something the coordinator is about to acknowledge.
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn.pragma_update(None, "foreign_keys", true)?;
        // Negative means KiB: 16 MiB of page cache (SQLite's default is 2 MiB), so the journal's
        // indexes stay in memory as it grows and updates do not re-read pages through the OS.
        self.conn.pragma_update(None, "cache_size", -16_384)?;
        Ok(())
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Stores an unsigned count or timestamp in SQLite's signed 64-bit integer.
fn to_sql_int(value: u64, what: &'static str) -> Result<i64, Fail> {
    i64::try_from(value).map_err(|_| Fail::Store(StoreError::OutOfRange { what, value }))
}

/// The wall clock in Unix milliseconds, for the timestamps the store's convenience methods add
/// ([`Store::finish_task`], [`Store::save_nodes`]); [`Batch`] methods take the time as a
/// parameter instead. A clock before 1970 reads as 0.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Reads back a value written by [`to_sql_int`]; a negative one means the file was edited.
fn from_sql_int(value: i64, what: &str) -> Result<u64, Fail> {
    u64::try_from(value).map_err(|_| Fail::Corrupt(format!("{what} is negative ({value})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_creates_the_file_and_its_directory_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("coordinator.db");
        let store = Store::open(&path).unwrap();
        assert!(path.is_file());
        let mode: String = store
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = store
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous = FULL");
        let fk: i64 = store
            .conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
    }

    #[test]
    fn reopening_a_database_keeps_its_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        drop(Store::open(&path).unwrap());
        let store = Store::open(&path).unwrap();
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_read_only_open_of_a_missing_file_says_how_to_create_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nothing-here.db");
        let err = Store::open_read_only(&path).unwrap_err();
        assert!(matches!(err, StoreError::Missing { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("start `ambient coordinator` first or pass --data-dir"));
        assert!(!path.exists(), "a read-only open must not create the file");
    }

    #[test]
    fn a_read_only_store_can_read_while_a_writer_holds_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut writer = Store::open(&path).unwrap();
        writer
            .insert_tasks(&[tasks::tests::new_task("before", 1)])
            .unwrap();

        let reader = Store::open_read_only(&path).unwrap();
        // The writer is mid-transaction while the reader reads: WAL lets the reader see the last
        // committed state instead of waiting.
        let mut batch = writer.batch().unwrap();
        batch
            .insert_task(&tasks::tests::new_task("during", 2))
            .unwrap();
        let seen = reader.tasks(10, None).unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].task_id.as_str(), "before");
        batch.commit().unwrap();
        assert_eq!(reader.tasks(10, None).unwrap().len(), 2);

        let err = reader.put_module(&ambient_core::sha3_256(b"x"), b"x");
        assert!(
            matches!(err, Err(StoreError::Sqlite { .. })),
            "a read-only store refuses writes: {err:?}"
        );
    }

    #[test]
    fn a_read_only_store_opens_a_database_no_writer_is_using() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let mut writer = Store::open(&path).unwrap();
            writer
                .insert_tasks(&[tasks::tests::new_task("t1", 1)])
                .unwrap();
        }
        let reader = Store::open_read_only(&path).unwrap();
        assert_eq!(reader.tasks(10, None).unwrap().len(), 1);
    }

    #[test]
    fn a_batch_commits_every_kind_of_write_together_and_a_dropped_one_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("c.db")).unwrap();
        let task = tasks::tests::new_task("t", 1);
        let node = ambient_core::NodeId([5; 16]);

        let mut batch = store.batch().unwrap();
        batch.insert_task(&task).unwrap();
        batch.record_dispatch(&task.task_id, 1, &node, 2).unwrap();
        batch
            .finish_task(&task.task_id, TaskStatus::Completed, "{}", 3)
            .unwrap();
        batch.settle(&task.task_id, "alice", &[(node, 10)]).unwrap();
        drop(batch);
        assert_eq!(store.task(&task.task_id).unwrap(), None);
        assert_eq!(store.verify_ledger().unwrap().entries, 0);

        let mut batch = store.batch().unwrap();
        batch.insert_task(&task).unwrap();
        batch.record_dispatch(&task.task_id, 1, &node, 2).unwrap();
        batch
            .finish_task(&task.task_id, TaskStatus::Completed, "{}", 3)
            .unwrap();
        batch.settle(&task.task_id, "alice", &[(node, 10)]).unwrap();
        batch.commit().unwrap();
        let row = store.task(&task.task_id).unwrap().unwrap();
        assert_eq!(
            (row.status, row.attempts, row.finished_ms),
            (TaskStatus::Completed, 1, Some(3))
        );
        assert_eq!(store.task_earnings(&task.task_id).unwrap(), [(node, 10)]);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        std::fs::write(
            &path,
            b"this is not sqlite, just some text long enough to matter",
        )
        .unwrap();
        let err = Store::open(&path).unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
    }
}
