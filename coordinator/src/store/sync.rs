//! Commits written now, made durable later: the store's half of the coordinator's commit
//! pipeline.
//!
//! In WAL mode every commit appends its pages and a commit frame to the `-wal` file; with
//! `synchronous = FULL` SQLite then fsyncs that file before the commit returns. After
//! [`Store::defer_sync`](super::Store::defer_sync) the connection runs with
//! `synchronous = NORMAL` instead: a commit is written to the operating system but not
//! fsynced, and [`WalSync::sync`], called from another thread, fsyncs the same file. One
//! `sync` makes every commit written before it durable, so the coordinator writes a turn's
//! transaction on its dispatcher thread, goes on to the next turn at once, and a second thread
//! syncs whatever turns were written meanwhile in one fsync (group commit across turns).
//!
//! Why nothing the coordinator says is lost:
//!
//! - A commit that was written but not yet synced is exactly what `NORMAL` allows to vanish in
//!   a power cut; the coordinator treats it as not yet committed: nothing it sends that depends
//!   on it (a PUBACK, an event, a result) leaves before a `sync` that began after it returned.
//!   `fdatasync` flushes the file, whichever descriptor wrote it.
//! - The database stays consistent either way: SQLite recovers the WAL up to its last intact
//!   commit frame, and its checkpoints still fsync the WAL before copying pages into the
//!   database and the database after (they run inside a commit, on the writer's thread).
//! - The `-wal` file is the same file for the whole run: SQLite deletes it only when the last
//!   connection closes, and the coordinator's stays open, so CLI commands that open the
//!   database meanwhile cannot be the last. [`WalSync::sync`] refuses to go on if the file it
//!   holds was deleted anyway (by hand).
//!
//! What it does not cover: other connections see a commit as soon as it is written. The HTTP
//! API and the CLI's reads (`ambient tasks`, `ambient ledger`) may therefore show a turn up to
//! one fsync before it is durable, and a power cut in that window takes it back; the task then
//! runs again and is settled once. On kernels before 4.13, an I/O error that SQLite's own
//! checkpoint sync consumed would not be reported to this handle.

use std::fs::File;
use std::path::PathBuf;

use super::StoreError;

/// A handle that fsyncs the database's write-ahead log; see the module docs.
///
/// `Send`: it holds its own file descriptor, so it may live on another thread than the
/// [`Store`](super::Store) whose commits it makes durable.
#[derive(Debug)]
pub struct WalSync {
    wal: File,
    path: PathBuf,
}

impl WalSync {
    pub(super) fn open(path: PathBuf) -> Result<WalSync, StoreError> {
        let wal = File::open(&path).map_err(|source| StoreError::Sync {
            path: path.clone(),
            source,
        })?;
        Ok(WalSync { wal, path })
    }

    /// Makes every commit written before this call durable (one `fdatasync` of the WAL).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sync`] when the operating system reports that the log could not be
    /// written to disk: those commits may be lost, so nothing that depends on them may be
    /// acknowledged.
    pub fn sync(&self) -> Result<(), StoreError> {
        let failed = |source| StoreError::Sync {
            path: self.path.clone(),
            source,
        };
        self.wal.sync_data().map_err(failed)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            if self.wal.metadata().map_err(failed)?.nlink() == 0 {
                return Err(failed(std::io::Error::other(
                    "the file was deleted while the coordinator ran; its commits are not on disk",
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{Op, Store};

    use super::WalSync;

    #[test]
    fn a_missing_wal_is_an_error_that_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = WalSync::open(dir.path().join("none-wal")).unwrap_err();
        assert!(err.to_string().contains("none-wal"), "{err}");
    }

    #[test]
    fn deferring_sync_turns_off_sqlites_fsync_and_hands_out_a_handle_on_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut store = Store::open(&path).unwrap();
        let wal = store.defer_sync().unwrap();
        let sync: i64 = store
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1, "synchronous = NORMAL");
        store
            .apply(&[Op::PutModule {
                hash: ambient_core::sha3_256(b"m"),
                bytes: b"m".to_vec(),
            }])
            .unwrap();
        let written = std::fs::metadata(dir.path().join("c.db-wal"))
            .unwrap()
            .len();
        assert!(written > 0, "the commit is in the WAL");
        wal.sync().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            let on_disk = std::fs::metadata(dir.path().join("c.db-wal"))
                .unwrap()
                .ino();
            assert_eq!(
                wal.wal.metadata().unwrap().ino(),
                on_disk,
                "the handle is SQLite's WAL"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_wal_deleted_under_the_coordinator_fails_the_sync_instead_of_acknowledging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut store = Store::open(&path).unwrap();
        let wal = store.defer_sync().unwrap();
        std::fs::remove_file(dir.path().join("c.db-wal")).unwrap();
        let err = wal.sync().unwrap_err();
        assert!(err.to_string().contains("deleted"), "{err}");
    }

    #[test]
    fn a_reopened_database_hands_out_its_wal_before_the_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        drop(Store::open(&path).unwrap());
        let mut store = Store::open(&path).unwrap();
        let wal = store.defer_sync().unwrap();
        wal.sync().unwrap();
    }
}
