//! The outbox: reports the broker has not yet acknowledged, and the disk copy of those that
//! waited.
//!
//! A report is published the moment it is made and kept in memory until the broker
//! acknowledges it. It is written to disk only when it has to outlive the process: the broker
//! has not acknowledged it within [`WRITE_AFTER`], the connection is down, or the agent is
//! stopping. So on a healthy link no report touches the disk (no fsync on the result's path,
//! no SD-card wear on a Pi), and a report made while the broker is away survives a restart. A
//! crash inside that window loses a report the broker may not have; the coordinator's dispatch
//! deadline then runs the task again, exactly as after a crash mid-execution.
//!
//! On disk: one file per report, `<seq>.report` with a zero-padded sequence number so that
//! names sort in the order reports were made. A file is written to `<seq>.tmp`, synced, renamed
//! and the directory synced, so after a crash a report is either whole or absent. Files are
//! written and deleted by one [`Writer`] thread, in the order the agent asked; a write whose
//! delete is already queued behind it is skipped together with the delete.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;

/// How long a published report may wait for the broker's acknowledgement before it is
/// written to disk.
pub(crate) const WRITE_AFTER: Duration = Duration::from_secs(1);

/// Reports found on disk at start: sequence number and frame, oldest first.
pub(crate) type Stored = Vec<(u64, Vec<u8>)>;

/// The outbox directory. Sequence numbers are the node's to hand out (after the last stored).
#[derive(Debug)]
pub(crate) struct OutboxDir {
    dir: PathBuf,
}

impl OutboxDir {
    /// Opens (creating) `dir`, removes half-written files, and returns every stored report in order.
    pub fn open(dir: &Path) -> io::Result<(Self, Stored)> {
        ambient_daemon::create_private_dir(dir)?;
        let mut stored = Vec::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if let Some(seq) = name
                .strip_suffix(".report")
                .and_then(|s| s.parse::<u64>().ok())
            {
                match fs::read(&path) {
                    Ok(bytes) => stored.push((seq, bytes)),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "unreadable outbox entry")
                    }
                }
            } else if name.ends_with(".tmp") {
                // Never renamed into place, so never published: the task's report was not
                // finished when the agent stopped.
                let _ = fs::remove_file(&path);
            }
        }
        stored.sort_by_key(|(seq, _)| *seq);
        Ok((
            Self {
                dir: dir.to_owned(),
            },
            stored,
        ))
    }

    fn path(&self, seq: u64, ext: &str) -> PathBuf {
        self.dir.join(format!("{seq:020}.{ext}"))
    }

    /// Stores `payload` durably under `seq`.
    pub fn write(&self, seq: u64, payload: &[u8]) -> io::Result<()> {
        let tmp = self.path(seq, "tmp");
        let mut file = fs::File::create(&tmp)?;
        file.write_all(payload)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, self.path(seq, "report"))?;
        fs::File::open(&self.dir)?.sync_all()
    }

    /// Deletes a delivered report. A report whose deletion is lost in a crash is sent again
    /// after the restart, which the coordinator deduplicates.
    pub fn remove(&self, seq: u64) {
        if let Err(e) = fs::remove_file(self.path(seq, "report"))
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(seq, error = %e, "could not delete a delivered report");
        }
    }
}

/// A file operation, in the order the agent asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Write(u64, Bytes),
    Remove(u64),
}

/// Drops every write whose delete follows it in `ops`, with that delete: the broker
/// acknowledged the report before its file was made.
fn coalesce(ops: Vec<Op>) -> Vec<Op> {
    let written: HashSet<u64> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Write(seq, _) => Some(*seq),
            Op::Remove(_) => None,
        })
        .collect();
    let acknowledged: HashSet<u64> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Remove(seq) if written.contains(seq) => Some(*seq),
            _ => None,
        })
        .collect();
    ops.into_iter()
        .filter(|op| match op {
            Op::Write(seq, _) | Op::Remove(seq) => !acknowledged.contains(seq),
        })
        .collect()
}

/// The thread that writes and deletes report files, in order, off the agent's event loop.
#[derive(Debug)]
pub(crate) struct Writer {
    tx: Option<mpsc::Sender<Op>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn spawn(dir: Arc<OutboxDir>) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Op>();
        let thread = std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let batch = std::iter::once(first).chain(rx.try_iter()).collect();
                    for op in coalesce(batch) {
                        match op {
                            Op::Write(seq, payload) => {
                                if let Err(e) = dir.write(seq, &payload) {
                                    tracing::error!(seq, error = %e, "cannot store a report in the outbox; it is lost if the agent stops before the broker takes it");
                                }
                            }
                            Op::Remove(seq) => dir.remove(seq),
                        }
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// A writer that was closed: what it is sent is dropped.
    pub fn closed() -> Self {
        Self {
            tx: None,
            thread: None,
        }
    }

    pub fn send(&self, op: Op) {
        if let Some(tx) = &self.tx {
            // The thread only ends when the sender is dropped, so this cannot fail.
            let _ = tx.send(op);
        }
    }

    /// Finishes every queued operation and stops the thread. Blocks.
    pub fn close(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_reports_come_back_in_order_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, stored) = OutboxDir::open(dir.path()).unwrap();
        assert!(stored.is_empty());
        let [a, b, c] = [0, 1, 2];
        outbox.write(a, b"first").unwrap();
        outbox.write(b, b"second").unwrap();
        outbox.write(c, b"third").unwrap();
        outbox.remove(b);
        fs::write(dir.path().join("00000000000000000099.tmp"), b"half").unwrap();

        let (_, stored) = OutboxDir::open(dir.path()).unwrap();
        assert_eq!(stored, vec![(a, b"first".to_vec()), (c, b"third".to_vec())]);
        assert!(!dir.path().join("00000000000000000099.tmp").exists());
    }

    #[test]
    fn a_write_acknowledged_before_its_turn_is_skipped_with_its_delete() {
        let w = |seq| Op::Write(seq, Bytes::from_static(b"r"));
        let ops = vec![w(1), w(2), Op::Remove(1), Op::Remove(7), w(3)];
        // 1 was acknowledged before it was written; 7 was written in an earlier batch.
        assert_eq!(coalesce(ops), vec![w(2), Op::Remove(7), w(3)]);
    }

    #[test]
    fn the_writer_finishes_queued_writes_and_deletes_before_it_closes() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _) = OutboxDir::open(dir.path()).unwrap();
        let outbox = Arc::new(outbox);
        let mut writer = Writer::spawn(outbox.clone()).unwrap();
        let [a, b] = [0, 1];
        writer.send(Op::Write(a, Bytes::from_static(b"kept")));
        writer.send(Op::Write(b, Bytes::from_static(b"delivered")));
        writer.send(Op::Remove(b));
        writer.close();
        let (_, stored) = OutboxDir::open(dir.path()).unwrap();
        assert_eq!(stored, vec![(a, b"kept".to_vec())]);
    }

    #[test]
    fn names_sort_in_sequence_order() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _) = OutboxDir::open(dir.path()).unwrap();
        assert_eq!(
            outbox.path(9, "report").file_name().unwrap(),
            "00000000000000000009.report"
        );
        assert!(outbox.path(9, "report") < outbox.path(10, "report"));
    }
}
