use std::path::Path;

use ambient_core::Digest;
use rusqlite::Transaction;

use super::{Fail, StoreError};

/// Several writes committed together: one transaction, one fsync (unless the store's sync is
/// deferred, see [`Store::defer_sync`](super::Store::defer_sync)).
///
/// Start one with [`Store::batch`](super::Store::batch), call any of the write methods
/// ([`insert_task`](Batch::insert_task), [`record_dispatch`](Batch::record_dispatch),
/// [`finish_task`](Batch::finish_task), [`settle`](Batch::settle),
/// [`save_nodes`](Batch::save_nodes)), then [`commit`](Batch::commit). Nothing is visible to
/// other connections, or durable, before `commit` returns `Ok`; dropping the batch instead rolls
/// everything back.
///
/// The coordinator's store task can gather everything one turn of its loop produced (new
/// submissions, dispatches, outcomes, settlements) into one batch and acknowledge all of it after
/// a single fsync. While a batch is open it holds the database's write lock.
///
/// # Errors inside a batch
///
/// The domain errors ([`StoreError::UnknownTask`], [`StoreError::NotTerminal`],
/// [`StoreError::DuplicatePayee`], [`StoreError::OutOfRange`]) are detected before anything is
/// written, so the batch is unchanged and may go on. After any other error, drop the batch.
pub struct Batch<'s> {
    pub(super) tx: Transaction<'s>,
    path: &'s Path,
    /// The ledger's last `(seq, hash)` once read in this batch, so consecutive settlements chain
    /// in memory instead of re-reading it.
    pub(super) ledger_head: Option<(u64, Digest)>,
}

impl<'s> Batch<'s> {
    pub(super) fn new(tx: Transaction<'s>, path: &'s Path) -> Self {
        Batch {
            tx,
            path,
            ledger_head: None,
        }
    }

    /// Commits every write of the batch; when this returns `Ok` they are on disk.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] if the commit fails (a full disk, an I/O error); nothing of the
    /// batch is then kept.
    pub fn commit(self) -> Result<(), StoreError> {
        let path = self.path;
        self.tx
            .commit()
            .map_err(|e| Fail::from(e).at("commit a write", path))
    }

    /// Runs `f` on the transaction, naming `op` and the file in any error.
    pub(super) fn run<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut Self) -> Result<T, Fail>,
    ) -> Result<T, StoreError> {
        let path = self.path;
        f(self).map_err(|e| e.at(op, path))
    }
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("path", &self.path).finish()
    }
}
