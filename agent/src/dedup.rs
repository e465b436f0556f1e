//! Remembers the last N assignments by (task id, attempt), so an at-least-once redelivery is
//! recognised instead of run twice. Bounded: the oldest finished entries are forgotten first,
//! and report payloads kept for resending are bounded in bytes.

use std::collections::{HashMap, VecDeque};

use ambient_core::TaskId;
use bytes::Bytes;

pub(crate) type TaskKey = (TaskId, u16);

/// What is known about an assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Admitted and not yet reported.
    Active,
    /// Reported: its outbox sequence number and the report (while the byte budget lasts).
    Done { seq: u64, report: Option<Bytes> },
}

#[derive(Debug)]
pub(crate) struct Dedup {
    entries: HashMap<TaskKey, Seen>,
    order: VecDeque<TaskKey>,
    capacity: usize,
    report_bytes: usize,
    report_budget: usize,
}

impl Dedup {
    /// Remembers up to `capacity` assignments and `report_budget` bytes of reports.
    pub fn new(capacity: usize, report_budget: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            report_bytes: 0,
            report_budget,
        }
    }

    pub fn get(&self, key: &TaskKey) -> Option<&Seen> {
        self.entries.get(key)
    }

    /// Records an admitted assignment.
    pub fn start(&mut self, key: TaskKey) {
        if self.entries.insert(key.clone(), Seen::Active).is_none() {
            self.order.push_back(key);
        }
        self.evict();
    }

    /// Records the report of an assignment (admitted or refused).
    pub fn finish(&mut self, key: TaskKey, seq: u64, report: Bytes) {
        self.report_bytes += report.len();
        let done = Seen::Done {
            seq,
            report: Some(report),
        };
        match self.entries.insert(key.clone(), done) {
            Some(Seen::Done {
                report: Some(old), ..
            }) => self.report_bytes -= old.len(),
            Some(_) => {}
            None => self.order.push_back(key),
        }
        self.evict();
    }

    fn evict(&mut self) {
        // Drop reports, oldest first, until the byte budget holds.
        let mut i = 0;
        while self.report_bytes > self.report_budget && i < self.order.len() {
            if let Some(Seen::Done { report, .. }) = self.entries.get_mut(&self.order[i])
                && let Some(r) = report.take()
            {
                self.report_bytes -= r.len();
            }
            i += 1;
        }
        // Forget the oldest finished entries past the capacity; active ones stay (there are at
        // most max_concurrency of them).
        let mut scanned = 0;
        while self.entries.len() > self.capacity && scanned < self.order.len() {
            let Some(key) = self.order.pop_front() else {
                break;
            };
            match self.entries.get(&key) {
                Some(Seen::Active) => {
                    self.order.push_back(key);
                    scanned += 1;
                }
                Some(Seen::Done { report, .. }) => {
                    self.report_bytes -= report.as_ref().map_or(0, Bytes::len);
                    self.entries.remove(&key);
                }
                None => {}
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> TaskKey {
        (TaskId::new(&format!("t{i}")).unwrap(), 1)
    }

    #[test]
    fn a_finished_assignment_is_remembered_with_its_report() {
        let mut d = Dedup::new(16, 1 << 20);
        d.start(key(1));
        assert_eq!(d.get(&key(1)), Some(&Seen::Active));
        d.finish(key(1), 3, Bytes::from_static(b"report"));
        assert_eq!(
            d.get(&key(1)),
            Some(&Seen::Done {
                seq: 3,
                report: Some(Bytes::from_static(b"report"))
            })
        );
        assert_eq!(
            d.get(&(TaskId::new("t1").unwrap(), 2)),
            None,
            "another attempt is another assignment"
        );
    }

    #[test]
    fn memory_stays_bounded_and_the_oldest_are_forgotten_first() {
        let mut d = Dedup::new(100, 1_000);
        for i in 0..1_000 {
            d.finish(key(i), i as u64, Bytes::from(vec![0u8; 100]));
        }
        assert_eq!(d.len(), 100);
        assert!(d.get(&key(0)).is_none());
        assert!(d.report_bytes <= 1_000);
        assert!(matches!(
            d.get(&key(999)),
            Some(Seen::Done {
                report: Some(_),
                ..
            })
        ));
        assert!(matches!(
            d.get(&key(900)),
            Some(Seen::Done { report: None, .. })
        ));
    }

    #[test]
    fn active_assignments_are_never_forgotten() {
        let mut d = Dedup::new(16, 0);
        d.start(key(0));
        for i in 1..100 {
            d.finish(key(i), i as u64, Bytes::new());
        }
        assert_eq!(d.get(&key(0)), Some(&Seen::Active));
    }
}
