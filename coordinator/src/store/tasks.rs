//! The task journal: submissions, dispatches and outcomes.

use std::fmt;
use std::str::FromStr;

use ambient_core::{NodeId, TaskId};
use rusqlite::{OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

use super::{Batch, Fail, Store, StoreError, UnknownStatus, from_sql_int, to_sql_int, unix_ms};

/// A validated submission to journal before it is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    /// The task's id, unique in the journal.
    pub task_id: TaskId,
    /// Who submitted it and pays for it (the `client:<id>` ledger account).
    pub client: String,
    /// The validated submission as JSON: enough to dispatch it again after a restart.
    pub spec_json: String,
    /// When the coordinator accepted it, in Unix milliseconds.
    pub submitted_ms: u64,
}

/// What [`Store::insert_tasks`] did with one submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Journaled now.
    New,
    /// A task with this id was already journaled (earlier, or earlier in the same batch); the
    /// journal is unchanged. A client resubmitting after a lost acknowledgement lands here, so
    /// the coordinator answers with the existing task instead of running it twice.
    Duplicate,
}

/// What [`Store::finish_task`] did with one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The outcome is recorded now.
    Finished,
    /// The task already had an outcome, which is kept: the first result delivered stands.
    AlreadyFinished,
}

/// Where a task is in its life.
///
/// Stored and shown in lowercase (`pending`, `running`, `completed`, `failed`): see
/// [`as_str`](TaskStatus::as_str) and the [`FromStr`] impl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Journaled, not yet dispatched.
    Pending,
    /// Dispatched at least once, no outcome yet.
    Running,
    /// Final: a verified result was delivered.
    Completed,
    /// Final: the task was given up on; the delivered result says why.
    Failed,
}

impl TaskStatus {
    /// The status as stored and shown: `pending`, `running`, `completed` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
        }
    }

    /// Whether this status is final ([`Completed`](TaskStatus::Completed) or
    /// [`Failed`](TaskStatus::Failed)).
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskStatus::Completed | TaskStatus::Failed)
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = UnknownStatus;

    /// Parses the lowercase name written by [`TaskStatus::as_str`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(TaskStatus::Pending),
            "running" => Ok(TaskStatus::Running),
            "completed" => Ok(TaskStatus::Completed),
            "failed" => Ok(TaskStatus::Failed),
            other => Err(UnknownStatus(other.to_owned())),
        }
    }
}

/// A task without an outcome, as recovery after a restart needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournaledTask {
    /// The task's id.
    pub task_id: TaskId,
    /// Who submitted it.
    pub client: String,
    /// The submission as journaled by [`NewTask::spec_json`].
    pub spec_json: String,
    /// The highest attempt number dispatched so far; 0 if never dispatched.
    pub attempts: u16,
    /// When it was accepted, in Unix milliseconds.
    pub submitted_ms: u64,
    /// Every `(attempt, node)` it was dispatched as, each once, in attempt order: recovery
    /// sends these again under the same attempt numbers, so a node that already ran one
    /// answers with its stored report instead of running it again.
    pub dispatches: Vec<(u16, NodeId)>,
}

/// A task as `ambient tasks` and the HTTP API show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskRow {
    /// The task's id.
    pub task_id: TaskId,
    /// Who submitted it.
    pub client: String,
    /// Where it is in its life.
    pub status: TaskStatus,
    /// The highest attempt number dispatched so far; 0 if never dispatched.
    pub attempts: u16,
    /// When it was accepted, in Unix milliseconds.
    pub submitted_ms: u64,
    /// When it got its outcome, in Unix milliseconds; `None` while unfinished.
    pub finished_ms: Option<u64>,
    /// The result delivered to the client, as JSON; `None` while unfinished. Serialized as
    /// the object itself, under `result`, not as a string.
    #[serde(rename = "result", serialize_with = "embedded_json")]
    pub result_json: Option<String>,
}

/// Writes stored JSON text as the JSON value it is (a string if it does not parse).
fn embedded_json<S: serde::Serializer>(json: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    use serde::Serialize as _;
    match json {
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value) => value.serialize(s),
            Err(_) => text.serialize(s),
        },
        None => s.serialize_none(),
    }
}

impl Batch<'_> {
    /// Journals one submission, or reports that its id is already journaled.
    ///
    /// # Errors
    ///
    /// [`StoreError::OutOfRange`] if `submitted_ms` exceeds `i64::MAX`; [`StoreError::Sqlite`].
    pub fn insert_task(&mut self, task: &NewTask) -> Result<Inserted, StoreError> {
        self.run("insert a task", |b| {
            let submitted = to_sql_int(task.submitted_ms, "submitted_ms")?;
            let changed = b
                .tx
                .prepare_cached(
                    "INSERT INTO tasks (task_id, client, submitted_ms)
                     VALUES (?1, ?2, ?3) ON CONFLICT (task_id) DO NOTHING",
                )?
                .execute(params![task.task_id.as_str(), task.client, submitted])?;
            if changed == 0 {
                return Ok(Inserted::Duplicate);
            }
            let seq = b.tx.last_insert_rowid();
            b.tx.prepare_cached("INSERT INTO task_specs (task_seq, spec_json) VALUES (?1, ?2)")?
                .execute(params![seq, task.spec_json])?;
            Ok(Inserted::New)
        })
    }

    /// Records that `attempt` of a task went to `node` at `now_ms` (Unix milliseconds).
    ///
    /// Raises the task's attempt count to `attempt` if higher and moves a pending task to
    /// running. Recording the same attempt to the same node again changes nothing, and a task
    /// that already has an outcome keeps it (a late spot-check re-run is still recorded).
    ///
    /// # Errors
    ///
    /// [`StoreError::UnknownTask`] if the task was never journaled; [`StoreError::OutOfRange`];
    /// [`StoreError::Sqlite`].
    pub fn record_dispatch(
        &mut self,
        task_id: &TaskId,
        attempt: u16,
        node: &NodeId,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.run("record a dispatch", |b| {
            let now = to_sql_int(now_ms, "now_ms")?;
            let (seq, status, attempts) = journal_state(b, task_id)?;
            if status == TaskStatus::Pending || attempt > attempts {
                b.tx.prepare_cached(
                    "UPDATE tasks SET attempts = max(attempts, ?2),
                         status = CASE status WHEN 'pending' THEN 'running' ELSE status END
                     WHERE seq = ?1",
                )?
                .execute(params![seq, attempt])?;
            }
            b.tx.prepare_cached(
                "INSERT INTO dispatches (task_seq, attempt, node, dispatched_ms)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            )?
            .execute(params![seq, attempt, node.0, now])?;
            Ok(())
        })
    }

    /// Records a task's outcome at `now_ms` (Unix milliseconds): `status` must be
    /// [`Completed`](TaskStatus::Completed) or [`Failed`](TaskStatus::Failed), `result_json` is
    /// what was delivered to the client.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotTerminal`] for another status; [`StoreError::UnknownTask`] if the task
    /// was never journaled; [`StoreError::OutOfRange`]; [`StoreError::Sqlite`].
    pub fn finish_task(
        &mut self,
        task_id: &TaskId,
        status: TaskStatus,
        result_json: &str,
        now_ms: u64,
    ) -> Result<Finish, StoreError> {
        self.run("finish a task", |b| {
            if !status.is_terminal() {
                return Err(StoreError::NotTerminal {
                    task_id: task_id.clone(),
                    status,
                }
                .into());
            }
            let now = to_sql_int(now_ms, "now_ms")?;
            let (seq, current, _) = journal_state(b, task_id)?;
            if current.is_terminal() {
                return Ok(Finish::AlreadyFinished);
            }
            b.tx.prepare_cached("UPDATE tasks SET status = ?2, finished_ms = ?3 WHERE seq = ?1")?
                .execute(params![seq, status.as_str(), now])?;
            b.tx.prepare_cached(
                "INSERT INTO task_results (task_seq, result_json) VALUES (?1, ?2)",
            )?
            .execute(params![seq, result_json])?;
            Ok(Finish::Finished)
        })
    }
}

/// A journaled task's `(seq, status, attempts)`, or [`StoreError::UnknownTask`].
///
/// Read first and then updated by `seq`, rather than `UPDATE … WHERE task_id = ? RETURNING`:
/// SQLite runs `RETURNING` like a trigger, which makes every such update open a statement
/// journal, and that tripled the cost of a dispatch.
fn journal_state(b: &Batch<'_>, task_id: &TaskId) -> Result<(i64, TaskStatus, u16), Fail> {
    let row: Option<(i64, String, i64)> =
        b.tx.prepare_cached("SELECT seq, status, attempts FROM tasks WHERE task_id = ?1")?
            .query_row([task_id.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
    let Some((seq, status, attempts)) = row else {
        return Err(StoreError::UnknownTask {
            task_id: task_id.clone(),
        }
        .into());
    };
    let status = status
        .parse()
        .map_err(|e: UnknownStatus| Fail::Corrupt(format!("task {task_id}: {e}")))?;
    Ok((seq, status, parse_attempts(attempts)?))
}

impl Store {
    /// Journals submissions in one transaction (one fsync for the whole slice), returning what
    /// happened to each, in order.
    ///
    /// # Errors
    ///
    /// As [`Batch::insert_task`]; on error none of the slice is journaled.
    pub fn insert_tasks(&mut self, tasks: &[NewTask]) -> Result<Vec<Inserted>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|b| tasks.iter().map(|t| b.insert_task(t)).collect())
    }

    /// Records one dispatch and commits it; see [`Batch::record_dispatch`].
    ///
    /// # Errors
    ///
    /// As [`Batch::record_dispatch`].
    pub fn record_dispatch(
        &mut self,
        task_id: &TaskId,
        attempt: u16,
        node: &NodeId,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.write(|b| b.record_dispatch(task_id, attempt, node, now_ms))
    }

    /// Records several `(task, attempt, node)` dispatches at `now_ms` (Unix milliseconds) in one
    /// transaction.
    ///
    /// # Errors
    ///
    /// As [`Batch::record_dispatch`]; on error none of the slice is recorded.
    pub fn record_dispatches(
        &mut self,
        dispatches: &[(TaskId, u16, NodeId)],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if dispatches.is_empty() {
            return Ok(());
        }
        self.write(|b| {
            dispatches.iter().try_for_each(|(task, attempt, node)| {
                b.record_dispatch(task, *attempt, node, now_ms)
            })
        })
    }

    /// Records one outcome, stamped with the wall clock, and commits it; see
    /// [`Batch::finish_task`].
    ///
    /// # Errors
    ///
    /// As [`Batch::finish_task`].
    pub fn finish_task(
        &mut self,
        task_id: &TaskId,
        status: TaskStatus,
        result_json: &str,
    ) -> Result<Finish, StoreError> {
        let now_ms = unix_ms();
        self.write(|b| b.finish_task(task_id, status, result_json, now_ms))
    }

    /// Records several `(task, final status, delivered result JSON)` outcomes, stamped with the
    /// wall clock, in one transaction, returning what happened to each, in order.
    ///
    /// # Errors
    ///
    /// As [`Batch::finish_task`]; on error none of the slice is recorded.
    pub fn finish_tasks(
        &mut self,
        outcomes: &[(TaskId, TaskStatus, String)],
    ) -> Result<Vec<Finish>, StoreError> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let now_ms = unix_ms();
        self.write(|b| {
            outcomes
                .iter()
                .map(|(task, status, result)| b.finish_task(task, *status, result, now_ms))
                .collect()
        })
    }

    /// Every task without an outcome, in submission order, with its highest attempt and the
    /// nodes it went to: what the coordinator re-dispatches after a restart.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]; [`StoreError::Corrupt`] if a stored value is malformed.
    pub fn unfinished_tasks(&self) -> Result<Vec<JournaledTask>, StoreError> {
        self.read("list unfinished tasks", |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT t.task_id, t.client, s.spec_json, t.attempts, t.submitted_ms, d.node,
                        d.attempt
                 FROM tasks t JOIN task_specs s ON s.task_seq = t.seq
                 LEFT JOIN dispatches d ON d.task_seq = t.seq
                 WHERE t.status IN ('pending', 'running')
                 ORDER BY t.seq, d.attempt, d.dispatched_ms, d.node",
            )?;
            let mut rows = stmt.query([])?;
            let mut out: Vec<JournaledTask> = Vec::new();
            while let Some(row) = rows.next()? {
                let task_id: String = row.get(0)?;
                let node: Option<[u8; 16]> = row.get(5)?;
                let same_task = out.last().is_some_and(|t| t.task_id.as_str() == task_id);
                if !same_task {
                    out.push(JournaledTask {
                        task_id: parse_task_id(task_id)?,
                        client: row.get(1)?,
                        spec_json: row.get(2)?,
                        attempts: parse_attempts(row.get(3)?)?,
                        submitted_ms: from_sql_int(row.get(4)?, "submitted_ms")?,
                        dispatches: Vec::new(),
                    });
                }
                let attempt: Option<i64> = row.get(6)?;
                if let (Some(node), Some(attempt), Some(task)) = (node, attempt, out.last_mut()) {
                    // The primary key (task, attempt, node) makes each pair unique.
                    task.dispatches
                        .push((parse_attempts(attempt)?, NodeId(node)));
                }
            }
            Ok(out)
        })
    }

    /// How many journaled tasks are in each status.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]; [`StoreError::Corrupt`] for a status this build does not know.
    pub fn task_counts(&self) -> Result<Vec<(TaskStatus, u64)>, StoreError> {
        self.read("count tasks", |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT status, COUNT(*) FROM tasks GROUP BY status")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (status, n) = row?;
                let status = status
                    .parse::<TaskStatus>()
                    .map_err(|e| super::Fail::Corrupt(e.to_string()))?;
                out.push((status, super::from_sql_int(n, "count")?));
            }
            Ok(out)
        })
    }

    /// One task, or `None` if it was never journaled.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]; [`StoreError::Corrupt`] if a stored value is malformed.
    pub fn task(&self, task_id: &TaskId) -> Result<Option<TaskRow>, StoreError> {
        self.read("read a task", |conn| {
            conn.prepare_cached(&format!("{TASK_ROW} WHERE t.task_id = ?1"))?
                .query_row([task_id.as_str()], RawTaskRow::read)
                .optional()?
                .map(RawTaskRow::parse)
                .transpose()
        })
    }

    /// Up to `limit` tasks, newest first, optionally only those with `status`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]; [`StoreError::Corrupt`] if a stored value is malformed.
    pub fn tasks(
        &self,
        limit: usize,
        status: Option<TaskStatus>,
    ) -> Result<Vec<TaskRow>, StoreError> {
        self.read("list tasks", |conn| {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let raw = match status {
                None => conn
                    .prepare_cached(&format!("{TASK_ROW} ORDER BY t.seq DESC LIMIT ?1"))?
                    .query_map([limit], RawTaskRow::read)?
                    .collect::<Result<Vec<_>, _>>()?,
                Some(status) => conn
                    .prepare_cached(&format!(
                        "{TASK_ROW} WHERE t.status = ?1 ORDER BY t.seq DESC LIMIT ?2"
                    ))?
                    .query_map(params![status.as_str(), limit], RawTaskRow::read)?
                    .collect::<Result<Vec<_>, _>>()?,
            };
            raw.into_iter().map(RawTaskRow::parse).collect()
        })
    }
}

const TASK_ROW: &str = "SELECT t.task_id, t.client, t.status, t.attempts, t.submitted_ms, \
                        t.finished_ms, r.result_json \
                        FROM tasks t LEFT JOIN task_results r ON r.task_seq = t.seq";

/// A [`TaskRow`] as SQLite returns it, before its values are checked.
struct RawTaskRow {
    task_id: String,
    client: String,
    status: String,
    attempts: i64,
    submitted_ms: i64,
    finished_ms: Option<i64>,
    result_json: Option<String>,
}

impl RawTaskRow {
    fn read(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawTaskRow {
            task_id: row.get(0)?,
            client: row.get(1)?,
            status: row.get(2)?,
            attempts: row.get(3)?,
            submitted_ms: row.get(4)?,
            finished_ms: row.get(5)?,
            result_json: row.get(6)?,
        })
    }

    fn parse(self) -> Result<TaskRow, Fail> {
        Ok(TaskRow {
            status: self
                .status
                .parse()
                .map_err(|e: UnknownStatus| Fail::Corrupt(format!("task {}: {e}", self.task_id)))?,
            task_id: parse_task_id(self.task_id)?,
            client: self.client,
            attempts: parse_attempts(self.attempts)?,
            submitted_ms: from_sql_int(self.submitted_ms, "submitted_ms")?,
            finished_ms: self
                .finished_ms
                .map(|ms| from_sql_int(ms, "finished_ms"))
                .transpose()?,
            result_json: self.result_json,
        })
    }
}

pub(super) fn parse_task_id(s: String) -> Result<TaskId, Fail> {
    TaskId::new(&s).ok_or_else(|| Fail::Corrupt(format!("stored task id {s:?} is not valid")))
}

fn parse_attempts(n: i64) -> Result<u16, Fail> {
    u16::try_from(n).map_err(|_| Fail::Corrupt(format!("attempt count {n} is out of range")))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::store) fn new_task(id: &str, submitted_ms: u64) -> NewTask {
        NewTask {
            task_id: TaskId::new(id).unwrap(),
            client: "alice".into(),
            spec_json: format!(r#"{{"task_id":"{id}","module":"ab"}}"#),
            submitted_ms,
        }
    }

    fn id(s: &str) -> TaskId {
        TaskId::new(s).unwrap()
    }

    fn open() -> (tempfile::TempDir, std::path::PathBuf, Store) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.db");
        let store = Store::open(&path).unwrap();
        (dir, path, store)
    }

    #[test]
    fn a_task_inserted_is_found_after_reopening_the_file() {
        let (_dir, path, mut store) = open();
        let inserted = store.insert_tasks(&[new_task("t-1", 1_000)]).unwrap();
        assert_eq!(inserted, [Inserted::New]);
        drop(store);

        let store = Store::open(&path).unwrap();
        let row = store.task(&id("t-1")).unwrap().expect("journaled");
        assert_eq!(
            row,
            TaskRow {
                task_id: id("t-1"),
                client: "alice".into(),
                status: TaskStatus::Pending,
                attempts: 0,
                submitted_ms: 1_000,
                finished_ms: None,
                result_json: None,
            }
        );
        assert_eq!(store.task(&id("t-2")).unwrap(), None);
    }

    #[test]
    fn resubmitting_the_same_task_id_is_a_duplicate() {
        let (_dir, _path, mut store) = open();
        assert_eq!(
            store.insert_tasks(&[new_task("t-1", 1)]).unwrap(),
            [Inserted::New]
        );
        let mut again = new_task("t-1", 2);
        again.spec_json = "{}".into();
        let batch = [again, new_task("t-2", 3), new_task("t-2", 4)];
        assert_eq!(
            store.insert_tasks(&batch).unwrap(),
            [Inserted::Duplicate, Inserted::New, Inserted::Duplicate]
        );
        let first = store.task(&id("t-1")).unwrap().unwrap();
        assert_eq!(first.submitted_ms, 1, "the original submission is kept");
        assert_eq!(store.tasks(10, None).unwrap().len(), 2);
    }

    #[test]
    fn unfinished_tasks_survive_a_reopen_and_finished_ones_are_not_returned() {
        let (_dir, path, mut store) = open();
        store
            .insert_tasks(&[new_task("a", 1), new_task("b", 2), new_task("c", 3)])
            .unwrap();
        let (n1, n2) = (NodeId([1; 16]), NodeId([2; 16]));
        store.record_dispatch(&id("a"), 1, &n1, 10).unwrap();
        store.record_dispatch(&id("a"), 1, &n1, 11).unwrap(); // at-least-once: a resend
        store.record_dispatch(&id("a"), 2, &n2, 12).unwrap();
        store.record_dispatch(&id("b"), 1, &n2, 13).unwrap();
        assert_eq!(
            store
                .finish_task(&id("b"), TaskStatus::Completed, r#"{"ok":true}"#)
                .unwrap(),
            Finish::Finished
        );
        drop(store);

        let store = Store::open(&path).unwrap();
        let unfinished = store.unfinished_tasks().unwrap();
        let ids: Vec<&str> = unfinished.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"], "in submission order, without b");
        assert_eq!(unfinished[0].attempts, 2);
        assert_eq!(unfinished[0].dispatches, [(1, n1), (2, n2)]);
        assert_eq!(unfinished[0].client, "alice");
        assert_eq!(unfinished[0].spec_json, new_task("a", 1).spec_json);
        assert_eq!(unfinished[1].attempts, 0);
        assert!(unfinished[1].dispatches.is_empty());

        let a = store.task(&id("a")).unwrap().unwrap();
        assert_eq!(a.status, TaskStatus::Running);
        let b = store.task(&id("b")).unwrap().unwrap();
        assert_eq!(b.status, TaskStatus::Completed);
        assert!(
            b.finished_ms.is_some_and(|ms| ms > 1_600_000_000_000),
            "stamped with the wall clock"
        );
        assert_eq!(b.result_json.as_deref(), Some(r#"{"ok":true}"#));
    }

    #[test]
    fn a_second_outcome_for_a_task_keeps_the_first() {
        let (_dir, _path, mut store) = open();
        store.insert_tasks(&[new_task("a", 1)]).unwrap();
        let outcomes = [
            (id("a"), TaskStatus::Completed, "first".to_owned()),
            (id("a"), TaskStatus::Failed, "second".to_owned()),
        ];
        assert_eq!(
            store.finish_tasks(&outcomes).unwrap(),
            [Finish::Finished, Finish::AlreadyFinished]
        );
        let a = store.task(&id("a")).unwrap().unwrap();
        assert_eq!(a.status, TaskStatus::Completed);
        assert_eq!(a.result_json.as_deref(), Some("first"));
    }

    #[test]
    fn finishing_as_running_or_an_unknown_task_is_refused_and_writes_nothing() {
        let (_dir, _path, mut store) = open();
        store.insert_tasks(&[new_task("a", 1)]).unwrap();
        let err = store
            .finish_task(&id("a"), TaskStatus::Running, "{}")
            .unwrap_err();
        assert!(matches!(err, StoreError::NotTerminal { .. }), "{err:?}");
        let outcomes = [
            (id("a"), TaskStatus::Completed, "{}".to_owned()),
            (id("nope"), TaskStatus::Completed, "{}".to_owned()),
        ];
        let err = store.finish_tasks(&outcomes).unwrap_err();
        assert!(matches!(err, StoreError::UnknownTask { .. }), "{err:?}");
        assert_eq!(
            store.task(&id("a")).unwrap().unwrap().status,
            TaskStatus::Pending,
            "the failed batch rolled back"
        );
        let err = store
            .record_dispatch(&id("nope"), 1, &NodeId([0; 16]), 1)
            .unwrap_err();
        assert!(matches!(err, StoreError::UnknownTask { .. }), "{err:?}");
    }

    #[test]
    fn tasks_are_listed_newest_first_and_filtered_by_status() {
        let (_dir, _path, mut store) = open();
        let batch: Vec<NewTask> = (0..5).map(|i| new_task(&format!("t{i}"), i)).collect();
        store.insert_tasks(&batch).unwrap();
        store
            .record_dispatches(
                &[
                    (id("t1"), 1, NodeId([1; 16])),
                    (id("t3"), 1, NodeId([1; 16])),
                ],
                9,
            )
            .unwrap();
        let mut batch = store.batch().unwrap();
        batch
            .finish_task(&id("t3"), TaskStatus::Failed, "{}", 10)
            .unwrap();
        batch.commit().unwrap();

        let all: Vec<String> = store
            .tasks(3, None)
            .unwrap()
            .into_iter()
            .map(|t| t.task_id.to_string())
            .collect();
        assert_eq!(all, ["t4", "t3", "t2"]);
        let running = store.tasks(10, Some(TaskStatus::Running)).unwrap();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].task_id, id("t1"));
        let failed = store.tasks(10, Some(TaskStatus::Failed)).unwrap();
        assert_eq!(failed[0].task_id, id("t3"));
    }

    #[test]
    fn a_task_row_serializes_with_a_lowercase_status() {
        let row = TaskRow {
            task_id: id("t-1"),
            client: "alice".into(),
            status: TaskStatus::Completed,
            attempts: 1,
            submitted_ms: 5,
            finished_ms: Some(6),
            result_json: Some("{}".into()),
        };
        assert_eq!(
            serde_json::to_string(&row).unwrap(),
            r#"{"task_id":"t-1","client":"alice","status":"completed","attempts":1,"submitted_ms":5,"finished_ms":6,"result":{}}"#
        );
    }

    #[test]
    fn task_statuses_round_trip_through_their_lowercase_names() {
        for s in [
            TaskStatus::Pending,
            TaskStatus::Running,
            TaskStatus::Completed,
            TaskStatus::Failed,
        ] {
            assert_eq!(s.as_str().parse::<TaskStatus>(), Ok(s));
        }
        assert_eq!(
            "done".parse::<TaskStatus>(),
            Err(UnknownStatus("done".into()))
        );
    }

    #[test]
    fn a_task_row_shows_its_result_as_json_not_as_a_string() {
        let row = TaskRow {
            task_id: TaskId::new("t").unwrap(),
            client: "c".into(),
            status: TaskStatus::Completed,
            attempts: 1,
            submitted_ms: 1,
            finished_ms: Some(2),
            result_json: Some(r#"{"status":"completed","reward":7}"#.into()),
        };
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(json["result"]["reward"], 7);
        assert!(json.get("result_json").is_none());
    }
}
