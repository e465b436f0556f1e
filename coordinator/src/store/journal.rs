//! Journal operations as data: what the dispatcher decides to write, applied by the service in
//! one transaction per loop turn (group commit).

use ambient_core::{Digest, NodeId, TaskId};
use rusqlite::OptionalExtension;

use super::{NewTask, Store, StoreError, TaskStatus};

/// What [`Store::known`] reads.
const KNOWN: &str = "SELECT s.spec_json, r.result_json
     FROM tasks t JOIN task_specs s ON s.task_seq = t.seq
     LEFT JOIN task_results r ON r.task_seq = t.seq
     WHERE t.task_id = ?1";

/// One write the dispatcher asks for. The service gathers every `Op` of one loop turn and
/// applies them with [`Store::apply`]: one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Journal an accepted submission ([`Batch::insert_task`](super::Batch::insert_task)).
    Insert(NewTask),
    /// Record that `attempt` of a task went to `node` at `at_ms` (Unix milliseconds).
    Dispatch {
        /// The task.
        task_id: TaskId,
        /// The attempt number.
        attempt: u16,
        /// Where it went.
        node: NodeId,
        /// When, in Unix milliseconds.
        at_ms: u64,
    },
    /// Debit `client` and credit each payee, once per task.
    Settle {
        /// The task.
        task_id: TaskId,
        /// The paying client.
        client: String,
        /// `(node, µcredits)` per agreeing node.
        payees: Vec<(NodeId, u64)>,
    },
    /// Record a task's outcome and the result delivered to the client.
    Finish {
        /// The task.
        task_id: TaskId,
        /// [`TaskStatus::Completed`] or [`TaskStatus::Failed`].
        status: TaskStatus,
        /// The final event as delivered, JSON.
        result_json: String,
        /// When, in Unix milliseconds.
        at_ms: u64,
    },
    /// Store a module's bytes under their sha3-256.
    PutModule {
        /// sha3-256 of `bytes`, already checked.
        hash: Digest,
        /// The module.
        bytes: Vec<u8>,
    },
    /// Journal a key that waits for the operator's verdict, with the node's signed announce.
    Pending {
        /// The node's public key.
        public_key: [u8; 32],
        /// Its announce, as the envelope frame it arrived in.
        frame: Vec<u8>,
        /// When, in Unix milliseconds.
        at_ms: u64,
    },
    /// Replace the registry snapshot `ambient nodes` reads: `(node, JSON view)`.
    SaveNodes {
        /// Every node's view.
        rows: Vec<(NodeId, String)>,
        /// The dispatcher's drop counters, by name.
        dropped: Vec<(&'static str, u64)>,
        /// When, in Unix milliseconds.
        at_ms: u64,
    },
}

/// What the journal already holds under a task id: enough to tell an idempotent resubmission
/// from a conflicting one, and to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The submission as journaled ([`NewTask::spec_json`]).
    pub spec_json: String,
    /// The final event delivered, once the task has one.
    pub result_json: Option<String>,
}

impl Store {
    /// Applies `ops` in order in one transaction: when this returns `Ok` all of them are on
    /// disk; on error none is.
    ///
    /// # Errors
    ///
    /// The first operation's error ([`StoreError::UnknownTask`] for a dispatch or outcome of a
    /// task never journaled, [`StoreError::Sqlite`] for I/O, a full disk, ...).
    pub fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.write(|b| {
            for op in ops {
                match op {
                    Op::Insert(task) => {
                        b.insert_task(task)?;
                    }
                    Op::Dispatch {
                        task_id,
                        attempt,
                        node,
                        at_ms,
                    } => b.record_dispatch(task_id, *attempt, node, *at_ms)?,
                    Op::Settle {
                        task_id,
                        client,
                        payees,
                    } => {
                        b.settle(task_id, client, payees)?;
                    }
                    Op::Finish {
                        task_id,
                        status,
                        result_json,
                        at_ms,
                    } => {
                        b.finish_task(task_id, *status, result_json, *at_ms)?;
                    }
                    Op::PutModule { hash, bytes } => {
                        b.put_module(hash, bytes)?;
                    }
                    Op::Pending {
                        public_key,
                        frame,
                        at_ms,
                    } => b.record_pending(public_key, frame, *at_ms)?,
                    Op::SaveNodes {
                        rows,
                        dropped,
                        at_ms,
                    } => {
                        b.save_nodes(rows, *at_ms)?;
                        b.save_dropped(dropped)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// The final events of tasks finished at or after `since_ms` (Unix milliseconds), oldest
    /// first: after a crash, the coordinator publishes them again, since one may have been
    /// committed and not yet published when it died.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]; [`StoreError::Corrupt`] for a malformed task id.
    pub fn finished_since(&self, since_ms: u64) -> Result<Vec<(TaskId, String)>, StoreError> {
        self.read("list recently finished tasks", |conn| {
            let since = i64::try_from(since_ms).unwrap_or(i64::MAX);
            let mut stmt = conn.prepare_cached(
                "SELECT t.task_id, r.result_json
                 FROM tasks t JOIN task_results r ON r.task_seq = t.seq
                 WHERE t.finished_ms >= ?1 ORDER BY t.seq",
            )?;
            let rows = stmt.query_map([since], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (id, json) = row?;
                let id = TaskId::new(&id)
                    .ok_or_else(|| super::Fail::Corrupt(format!("task id {id:?} is malformed")))?;
                out.push((id, json));
            }
            Ok(out)
        })
    }

    /// What the journal holds under `task_id`, or `None` if it was never journaled.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] if the read fails.
    pub fn known(&self, task_id: &TaskId) -> Result<Option<Known>, StoreError> {
        self.read("look up a task", |conn| {
            Ok(conn
                .prepare_cached(KNOWN)?
                .query_row([task_id.as_str()], |r| {
                    Ok(Known {
                        spec_json: r.get(0)?,
                        result_json: r.get(1)?,
                    })
                })
                .optional()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tasks::tests::new_task;

    #[test]
    fn a_turn_of_operations_commits_together_and_a_failing_one_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("c.db")).unwrap();
        let task = new_task("t", 1);
        let node = NodeId([3; 16]);
        let finish = Op::Finish {
            task_id: task.task_id.clone(),
            status: TaskStatus::Completed,
            result_json: "{\"done\":1}".into(),
            at_ms: 5,
        };
        let orphan = Op::Dispatch {
            task_id: TaskId::new("never-journaled").unwrap(),
            attempt: 1,
            node,
            at_ms: 2,
        };
        let failing = [Op::Insert(task.clone()), orphan];
        assert!(matches!(
            store.apply(&failing),
            Err(StoreError::UnknownTask { .. })
        ));
        assert_eq!(store.known(&task.task_id).unwrap(), None, "rolled back");

        store
            .apply(&[
                Op::Insert(task.clone()),
                Op::Dispatch {
                    task_id: task.task_id.clone(),
                    attempt: 1,
                    node,
                    at_ms: 2,
                },
                Op::Settle {
                    task_id: task.task_id.clone(),
                    client: "alice".into(),
                    payees: vec![(node, 7)],
                },
                finish,
            ])
            .unwrap();
        let known = store.known(&task.task_id).unwrap().unwrap();
        assert_eq!(known.spec_json, task.spec_json);
        assert_eq!(known.result_json.as_deref(), Some("{\"done\":1}"));
        assert_eq!(store.task_earnings(&task.task_id).unwrap(), [(node, 7)]);
        assert!(store.verify_ledger().unwrap().is_ok());
    }

    #[test]
    fn looking_up_a_task_reuses_its_prepared_statement() {
        // With SQLite's STAT4 (built into the bundled library) a statement whose plan may
        // depend on a bound value is prepared again at every run, unless the query planner
        // stability guarantee is on: that was a sixth of the dispatcher thread's time.
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("c.db")).unwrap();
        for i in 0..20 {
            let task = new_task(&format!("t{i}"), 1);
            store.apply(&[Op::Insert(task.clone())]).unwrap();
            assert!(store.known(&task.task_id).unwrap().is_some());
        }
        let lookup = store.conn.prepare_cached(KNOWN).unwrap();
        assert_eq!(lookup.get_status(rusqlite::StatementStatus::Run), 20);
        assert_eq!(lookup.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }
}
