use std::path::{Path, PathBuf};

use ambient_core::{NodeId, TaskId};

use super::TaskStatus;

/// What went wrong reading or writing the coordinator's database.
#[non_exhaustive]
#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    /// SQLite failed while the store was doing `op` on the file at `path`.
    #[error("cannot {op} in coordinator database {}: {source}", path.display())]
    Sqlite {
        /// What the store was doing, as a verb phrase ("insert tasks").
        op: &'static str,
        /// The database file.
        path: PathBuf,
        /// SQLite's own error.
        #[source]
        source: rusqlite::Error,
    },
    /// The directory for a new database could not be created.
    #[error("cannot create directory {} for the coordinator database: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The write-ahead log could not be opened or fsynced: the commits written since the last
    /// sync may be lost.
    #[error("cannot make commits durable in coordinator database log {}: {source}", path.display())]
    Sync {
        /// The `-wal` file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A read-only open found no file: the coordinator has never run with this data directory.
    #[error(
        "no coordinator database at {}: start `ambient coordinator` first or pass --data-dir",
        path.display()
    )]
    Missing {
        /// Where the database was expected.
        path: PathBuf,
    },
    /// The file was written by a newer build whose schema this build does not know.
    #[error(
        "coordinator database {} has schema version {found}, newer than version {supported} that this build understands: upgrade ambient",
        path.display()
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its `PRAGMA user_version`.
        found: i64,
        /// [`SCHEMA_VERSION`](super::SCHEMA_VERSION).
        supported: i64,
    },
    /// A read-only open found an older (or empty) schema, which only a writer may migrate.
    #[error(
        "coordinator database {} has schema version {found}, older than version {supported}: start `ambient coordinator` once to migrate it",
        path.display()
    )]
    NeedsMigration {
        /// The database file.
        path: PathBuf,
        /// Its `PRAGMA user_version` (0 for a file that is not yet a coordinator database).
        found: i64,
        /// [`SCHEMA_VERSION`](super::SCHEMA_VERSION).
        supported: i64,
    },
    /// Stored data breaks an invariant the store maintains: the file was edited or damaged.
    #[error("corrupt coordinator database {}: {what}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// Which value is wrong, and how.
        what: String,
    },
    /// A dispatch or outcome names a task that was never journaled.
    #[error("task {task_id} is not in the journal")]
    UnknownTask {
        /// The task.
        task_id: TaskId,
    },
    /// A task can only be finished as [`TaskStatus::Completed`] or [`TaskStatus::Failed`].
    #[error("cannot finish task {task_id} as {status}: only completed or failed are final")]
    NotTerminal {
        /// The task.
        task_id: TaskId,
        /// The status that was passed.
        status: TaskStatus,
    },
    /// The same node appears twice among one task's payees; sum its rewards first.
    #[error("cannot settle task {task_id}: node {node} is listed twice among the payees")]
    DuplicatePayee {
        /// The task.
        task_id: TaskId,
        /// The repeated node.
        node: NodeId,
    },
    /// A verdict names a node id that never announced itself, so its key is unknown.
    #[error(
        "node {node} has not announced itself to this coordinator: approve or revoke its public key instead (`ambient-agent --print-node-id` prints it)"
    )]
    NotEnrolled {
        /// The node.
        node: NodeId,
    },
    /// An unsigned value does not fit SQLite's signed 64-bit integers.
    #[error(
        "{what} = {value} is larger than the largest storable value {}",
        i64::MAX
    )]
    OutOfRange {
        /// Which value ("amount in µcredits", "submitted_ms").
        what: &'static str,
        /// The value.
        value: u64,
    },
}

/// Parsing a [`TaskStatus`] from text that is not one of its four names.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("unknown task status {0:?}: expected pending, running, completed or failed")]
pub struct UnknownStatus(pub String);

/// An error inside the store, before it learns which operation and file it belongs to.
///
/// Lets the internals use `?` on both rusqlite and domain errors; the public method attaches the
/// operation and path once, with [`Fail::at`].
#[derive(Debug)]
pub(super) enum Fail {
    Sqlite(rusqlite::Error),
    Corrupt(String),
    Store(StoreError),
}

impl Fail {
    pub(super) fn at(self, op: &'static str, path: &Path) -> StoreError {
        match self {
            Fail::Sqlite(source) => StoreError::Sqlite {
                op,
                path: path.to_path_buf(),
                source,
            },
            Fail::Corrupt(what) => StoreError::Corrupt {
                path: path.to_path_buf(),
                what,
            },
            Fail::Store(e) => e,
        }
    }
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sqlite(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}
