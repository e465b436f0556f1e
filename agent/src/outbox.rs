//! The durable outbox: every report is on disk before it is published, and leaves the disk
//! only when the broker has acknowledged it.
//!
//! One file per report, `<seq>.report` with a zero-padded sequence number so that names sort
//! in the order reports were made. A file is written to `<seq>.tmp`, synced, renamed and the
//! directory synced, so after a crash a report is either whole or absent. The methods block
//! (file system calls): use them from a blocking thread.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Reports found on disk at start: sequence number and frame, oldest first.
pub(crate) type Stored = Vec<(u64, Vec<u8>)>;

/// The outbox directory and the next sequence number.
#[derive(Debug)]
pub(crate) struct OutboxDir {
    dir: PathBuf,
    next: AtomicU64,
}

impl OutboxDir {
    /// Opens (creating) `dir`, removes half-written files, and returns every stored report in order.
    pub fn open(dir: &Path) -> io::Result<(Self, Stored)> {
        crate::engine::create_private_dir(dir)?;
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
        let next = stored.last().map_or(0, |(seq, _)| seq + 1);
        Ok((
            Self {
                dir: dir.to_owned(),
                next: AtomicU64::new(next),
            },
            stored,
        ))
    }

    fn path(&self, seq: u64, ext: &str) -> PathBuf {
        self.dir.join(format!("{seq:020}.{ext}"))
    }

    /// Stores `payload` durably and returns its sequence number.
    pub fn write(&self, payload: &[u8]) -> io::Result<u64> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let tmp = self.path(seq, "tmp");
        let mut file = fs::File::create(&tmp)?;
        file.write_all(payload)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, self.path(seq, "report"))?;
        fs::File::open(&self.dir)?.sync_all()?;
        Ok(seq)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_reports_come_back_in_order_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, stored) = OutboxDir::open(dir.path()).unwrap();
        assert!(stored.is_empty());
        let a = outbox.write(b"first").unwrap();
        let b = outbox.write(b"second").unwrap();
        let c = outbox.write(b"third").unwrap();
        outbox.remove(b);
        fs::write(dir.path().join("00000000000000000099.tmp"), b"half").unwrap();

        let (reopened, stored) = OutboxDir::open(dir.path()).unwrap();
        assert_eq!(stored, vec![(a, b"first".to_vec()), (c, b"third".to_vec())]);
        assert!(!dir.path().join("00000000000000000099.tmp").exists());
        assert!(reopened.write(b"fourth").unwrap() > c);
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
