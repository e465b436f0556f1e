//! The ledger: append-only, double-entry, hash-chained, credited once per task.
//!
//! Each row is one transfer of `amount` µcredits from a debit account (the paying client) to a
//! credit account (a node), so every row debits and credits the same amount and the balances of
//! all accounts always sum to zero. Each row also stores
//! `hash = chain_hash(previous hash, canonical_entry_bytes(row))`, the first row chaining from 32
//! zero bytes; [`Store::verify_ledger`] recomputes the chain, so editing, inserting or deleting
//! any row except the newest is detected. Record [`LedgerCheck::head`] somewhere else (a log, a
//! published topic) to pin the newest row as well.

use std::fmt::Display;

use ambient_core::{Digest, NodeId, TaskId, chain_hash};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Serialize, Serializer};

use super::tasks::parse_task_id;
use super::{Batch, Fail, Store, StoreError, from_sql_int, to_sql_int};

/// The account a client pays from: `client:<id>`.
pub fn client_account(client: &str) -> String {
    format!("client:{client}")
}

/// The account a node is paid into: `node:<32 lowercase hex>`.
pub fn node_account(node: &NodeId) -> String {
    format!("node:{}", node.to_hex())
}

/// The bytes a ledger entry's hash covers (format v1):
/// `seq|task_id|debit_account|credit_account|amount` as UTF-8, integers in decimal without sign
/// or leading zeros.
///
/// For example `1|t-1|client:alice|node:1111…1111|1500`. The encoding is unambiguous because
/// task ids and node accounts cannot contain `|` and the integers are at the ends, so only the
/// debit account (a client id of any text) may, and it is what remains in the middle.
pub fn canonical_entry_bytes(
    seq: u64,
    task_id: &str,
    debit_account: &str,
    credit_account: &str,
    amount: u64,
) -> Vec<u8> {
    canonical(seq, task_id, debit_account, credit_account, amount)
}

/// [`canonical_entry_bytes`] for any integer type, so verification can hash whatever a tampered
/// row holds (a negative amount formats the same way it would have been written).
fn canonical(
    seq: impl Display,
    task_id: &str,
    debit_account: &str,
    credit_account: &str,
    amount: impl Display,
) -> Vec<u8> {
    format!("{seq}|{task_id}|{debit_account}|{credit_account}|{amount}").into_bytes()
}

/// One row of the ledger: `amount` µcredits moved from `debit_account` to `credit_account` for a
/// task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    /// Position in the ledger, from 1 without gaps.
    pub seq: u64,
    /// The task paid for.
    pub task_id: TaskId,
    /// The account paying: [`client_account`].
    pub debit_account: String,
    /// The account paid: [`node_account`].
    pub credit_account: String,
    /// In micro-credits.
    pub amount: u64,
    /// `chain_hash(previous entry's hash, self.canonical_bytes())`; serialized as hex.
    #[serde(serialize_with = "digest_hex")]
    pub hash: Digest,
}

impl LedgerEntry {
    /// The bytes [`hash`](LedgerEntry::hash) covers; see [`canonical_entry_bytes`].
    pub fn canonical_bytes(&self) -> Vec<u8> {
        canonical_entry_bytes(
            self.seq,
            self.task_id.as_str(),
            &self.debit_account,
            &self.credit_account,
            self.amount,
        )
    }
}

/// What [`Store::settle`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// The task is paid now, by these entries (one per payee, in the order given).
    Settled {
        /// The entries appended.
        entries: Vec<LedgerEntry>,
        /// Their sum, in micro-credits.
        total: u64,
    },
    /// The ledger already pays this task; nothing was written.
    AlreadySettled,
}

/// One task's settlement, for [`Store::settle_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payout {
    /// The task paid for.
    pub task_id: TaskId,
    /// The paying client's id (without the `client:` prefix).
    pub client: String,
    /// Each node whose result was accepted, with its reward in micro-credits.
    pub payees: Vec<(NodeId, u64)>,
}

/// An account's position, summed over the whole ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Balance {
    /// `client:<id>` or `node:<hex>`.
    pub account: String,
    /// Credits minus debits, in micro-credits: negative for a client that has paid.
    pub balance: i64,
    /// How many ledger entries touch the account.
    pub entries: u64,
}

/// The result of [`Store::verify_ledger`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerCheck {
    /// How many entries the ledger holds.
    pub entries: u64,
    /// The stored hash of the newest entry (32 zero bytes for an empty ledger); serialized as
    /// hex. Keep it elsewhere to detect a later truncation.
    #[serde(serialize_with = "digest_hex")]
    pub head: Digest,
    /// Whether all accounts' balances sum to zero.
    pub balanced: bool,
    /// The `seq` of the first entry whose hash does not match its content and predecessor (or
    /// whose `seq` breaks the sequence); `None` if the whole chain holds.
    pub first_bad_entry: Option<u64>,
}

impl LedgerCheck {
    /// Whether the chain holds and the books balance.
    pub fn is_ok(&self) -> bool {
        self.balanced && self.first_bad_entry.is_none()
    }
}

fn digest_hex<S: Serializer>(digest: &Digest, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&digest.to_hex())
}

const GENESIS: Digest = Digest([0; 32]);

impl Batch<'_> {
    /// Pays a task: for each payee, debits `client`'s account and credits the node's, chaining
    /// each entry's hash to the previous one.
    ///
    /// Once per task: if the ledger already has entries for `task_id` this returns
    /// [`Settlement::AlreadySettled`] and writes nothing, so a retried settlement cannot pay twice
    /// (and `UNIQUE (task_id, credit_account)` in the schema backs this up). An empty `payees`
    /// writes nothing and does not count as settled.
    ///
    /// # Errors
    ///
    /// [`StoreError::DuplicatePayee`] if a node appears twice; [`StoreError::OutOfRange`] if an
    /// amount or the total exceeds `i64::MAX` µcredits; [`StoreError::Sqlite`].
    pub fn settle(
        &mut self,
        task_id: &TaskId,
        client: &str,
        payees: &[(NodeId, u64)],
    ) -> Result<Settlement, StoreError> {
        self.run("settle a task", |b| {
            let mut total: u64 = 0;
            for (i, (node, amount)) in payees.iter().enumerate() {
                if payees[..i].iter().any(|(n, _)| n == node) {
                    return Err(StoreError::DuplicatePayee {
                        task_id: task_id.clone(),
                        node: *node,
                    }
                    .into());
                }
                to_sql_int(*amount, "amount in µcredits")?;
                total = total.saturating_add(*amount);
            }
            // Balances are i64: a total beyond that would overflow the client's balance.
            to_sql_int(total, "total in µcredits")?;

            let settled: bool =
                b.tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM ledger WHERE task_id = ?1)")?
                    .query_row([task_id.as_str()], |r| r.get(0))?;
            if settled {
                return Ok(Settlement::AlreadySettled);
            }
            if payees.is_empty() {
                return Ok(Settlement::Settled {
                    entries: Vec::new(),
                    total: 0,
                });
            }

            let (mut seq, mut prev) = match b.ledger_head.take() {
                Some(head) => head,
                None => ledger_head(&b.tx)?,
            };
            let debit = client_account(client);
            let mut entries = Vec::with_capacity(payees.len());
            let mut insert = b.tx.prepare_cached(
                "INSERT INTO ledger (seq, task_id, debit_account, credit_account, amount, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (node, amount) in payees {
                seq += 1;
                let credit = node_account(node);
                let hash = chain_hash(
                    &prev,
                    &canonical(seq, task_id.as_str(), &debit, &credit, amount),
                );
                insert.execute(params![
                    to_sql_int(seq, "ledger seq")?,
                    task_id.as_str(),
                    debit,
                    credit,
                    to_sql_int(*amount, "amount in µcredits")?,
                    hash.0,
                ])?;
                entries.push(LedgerEntry {
                    seq,
                    task_id: task_id.clone(),
                    debit_account: debit.clone(),
                    credit_account: credit,
                    amount: *amount,
                    hash,
                });
                prev = hash;
            }
            drop(insert);
            // Only cached once every insert succeeded; after a failure the next settlement in
            // this batch re-reads the head from what the transaction really holds.
            b.ledger_head = Some((seq, prev));
            Ok(Settlement::Settled { entries, total })
        })
    }
}

/// The newest entry's `(seq, hash)`, or `(0, zeros)` for an empty ledger.
fn ledger_head(conn: &Connection) -> Result<(u64, Digest), Fail> {
    let head: Option<(i64, [u8; 32])> = conn
        .prepare_cached("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match head {
        None => Ok((0, GENESIS)),
        Some((seq, hash)) => Ok((from_sql_int(seq, "ledger seq")?, Digest(hash))),
    }
}

impl Store {
    /// Pays one task and commits; see [`Batch::settle`].
    ///
    /// # Errors
    ///
    /// As [`Batch::settle`]; on error nothing is written.
    pub fn settle(
        &mut self,
        task_id: &TaskId,
        client: &str,
        payees: &[(NodeId, u64)],
    ) -> Result<Settlement, StoreError> {
        self.write(|b| b.settle(task_id, client, payees))
    }

    /// Pays several tasks in one transaction, returning what happened to each, in order. A task
    /// listed twice is settled by its first payout.
    ///
    /// # Errors
    ///
    /// As [`Batch::settle`]; on error none of the payouts is written.
    pub fn settle_many(&mut self, payouts: &[Payout]) -> Result<Vec<Settlement>, StoreError> {
        if payouts.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|b| {
            payouts
                .iter()
                .map(|p| b.settle(&p.task_id, &p.client, &p.payees))
                .collect()
        })
    }

    /// Every account's balance, ordered by account name.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], including if a balance overflows `i64`.
    pub fn balances(&self) -> Result<Vec<Balance>, StoreError> {
        self.read("compute balances", balances)
    }

    /// Recomputes the hash chain from the first entry and checks that the books balance.
    ///
    /// A broken chain is reported in the returned [`LedgerCheck`], not as an error.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] if the ledger cannot be read.
    pub fn verify_ledger(&self) -> Result<LedgerCheck, StoreError> {
        self.read("verify the ledger", |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, task_id, debit_account, credit_account, amount, hash
                 FROM ledger ORDER BY seq",
            )?;
            let mut rows = stmt.query([])?;
            let mut entries: u64 = 0;
            let mut prev = GENESIS;
            let mut first_bad_entry = None;
            while let Some(row) = rows.next()? {
                entries += 1;
                let seq: i64 = row.get(0)?;
                // A row edited to hold the wrong types is a bad entry, not a failure to verify.
                let stored: Vec<u8> = row.get(5).unwrap_or_default();
                if first_bad_entry.is_none() {
                    let fields = (
                        row.get::<_, String>(1),
                        row.get::<_, String>(2),
                        row.get::<_, String>(3),
                        row.get::<_, i64>(4),
                    );
                    let expected = match fields {
                        (Ok(task), Ok(debit), Ok(credit), Ok(amount)) => Some(chain_hash(
                            &prev,
                            &canonical(seq, &task, &debit, &credit, amount),
                        )),
                        _ => None,
                    };
                    let in_sequence = u64::try_from(seq) == Ok(entries);
                    if !in_sequence || expected.is_none_or(|e| e.0[..] != stored[..]) {
                        // A negative seq cannot be named as u64; the position is the next best.
                        first_bad_entry = Some(u64::try_from(seq).unwrap_or(entries));
                    }
                }
                prev = Digest(stored.try_into().unwrap_or([0; 32]));
            }
            let total: i128 = balances(conn)?.iter().map(|b| i128::from(b.balance)).sum();
            Ok(LedgerCheck {
                entries,
                head: prev,
                balanced: total == 0,
                first_bad_entry,
            })
        })
    }

    /// The nodes a task paid and how much each got, in µcredits, in ledger order; empty if it is
    /// not settled.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]; [`StoreError::Corrupt`] if a credited node account is malformed.
    pub fn task_earnings(&self, task_id: &TaskId) -> Result<Vec<(NodeId, u64)>, StoreError> {
        self.read("read a task's earnings", |conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT credit_account, amount FROM ledger WHERE task_id = ?1 ORDER BY seq",
                )?
                .query_map([task_id.as_str()], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .filter_map(|(account, amount)| {
                    let hex = account.strip_prefix("node:")?;
                    Some(match NodeId::from_hex(hex) {
                        Some(node) => from_sql_int(amount, "ledger amount").map(|a| (node, a)),
                        None => Err(Fail::Corrupt(format!(
                            "ledger credits malformed node account {account:?}"
                        ))),
                    })
                })
                .collect()
        })
    }

    /// Up to `limit` ledger entries, newest first.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]; [`StoreError::Corrupt`] if a stored value is malformed.
    pub fn ledger(&self, limit: usize) -> Result<Vec<LedgerEntry>, StoreError> {
        self.read("list ledger entries", |conn| {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            type Raw = (i64, String, String, String, i64, [u8; 32]);
            let raw = conn
                .prepare_cached(
                    "SELECT seq, task_id, debit_account, credit_account, amount, hash
                     FROM ledger ORDER BY seq DESC LIMIT ?1",
                )?
                .query_map([limit], |r| -> rusqlite::Result<Raw> {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            raw.into_iter()
                .map(
                    |(seq, task_id, debit_account, credit_account, amount, hash)| {
                        Ok(LedgerEntry {
                            seq: from_sql_int(seq, "ledger seq")?,
                            task_id: parse_task_id(task_id)?,
                            debit_account,
                            credit_account,
                            amount: from_sql_int(amount, "ledger amount")?,
                            hash: Digest(hash),
                        })
                    },
                )
                .collect()
        })
    }
}

fn balances(conn: &Connection) -> Result<Vec<Balance>, Fail> {
    let raw = conn
        .prepare_cached(
            "SELECT account, SUM(delta), COUNT(*) FROM (
                 SELECT credit_account AS account, amount AS delta FROM ledger
                 UNION ALL
                 SELECT debit_account, -amount FROM ledger
             ) GROUP BY account ORDER BY account",
        )?
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    raw.into_iter()
        .map(|(account, balance, entries)| {
            Ok(Balance {
                account,
                balance,
                entries: from_sql_int(entries, "entry count")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn id(s: &str) -> TaskId {
        TaskId::new(s).unwrap()
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn the_canonical_entry_bytes_and_the_first_entry_hash_are_pinned() {
        let node = NodeId([0x11; 16]);
        let bytes = canonical_entry_bytes(
            1,
            "t-1",
            &client_account("alice"),
            &node_account(&node),
            1_500,
        );
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            "1|t-1|client:alice|node:11111111111111111111111111111111|1500"
        );
        let first = chain_hash(&Digest([0; 32]), &bytes);
        assert_eq!(first.to_hex().as_str(), GOLDEN_FIRST_HASH);

        // The store writes exactly these bytes and this hash.
        let (_dir, mut store) = open();
        let Settlement::Settled { entries, total } =
            store.settle(&id("t-1"), "alice", &[(node, 1_500)]).unwrap()
        else {
            panic!("first settlement");
        };
        assert_eq!(total, 1_500);
        assert_eq!(entries[0].canonical_bytes(), bytes);
        assert_eq!(entries[0].hash, first);
        assert_eq!(store.verify_ledger().unwrap().head, first);
    }

    /// sha3-256("ambient/ledger/v1\0" ‖ 32 zero bytes ‖ the bytes above), cross-checked with
    /// Python's `hashlib.sha3_256`.
    const GOLDEN_FIRST_HASH: &str =
        "bb82597db6b4a4c69ee56883cddbd36912edeea459bc57a67a466ccab66f1575";

    #[test]
    fn settling_twice_credits_once() {
        let (_dir, mut store) = open();
        let (a, b) = (NodeId([1; 16]), NodeId([2; 16]));
        let payees = [(a, 700), (b, 300)];
        let first = store.settle(&id("t"), "alice", &payees).unwrap();
        assert!(
            matches!(first, Settlement::Settled { total: 1_000, ref entries } if entries.len() == 2)
        );
        assert_eq!(
            store.settle(&id("t"), "alice", &payees).unwrap(),
            Settlement::AlreadySettled
        );
        assert_eq!(
            store
                .settle(&id("t"), "bob", &[(NodeId([3; 16]), 5)])
                .unwrap(),
            Settlement::AlreadySettled,
            "once per task, whoever asks"
        );
        let in_one_batch = [
            Payout {
                task_id: id("u"),
                client: "alice".into(),
                payees: vec![(a, 1)],
            },
            Payout {
                task_id: id("u"),
                client: "alice".into(),
                payees: vec![(a, 1)],
            },
        ];
        let results = store.settle_many(&in_one_batch).unwrap();
        assert!(matches!(results[0], Settlement::Settled { .. }));
        assert_eq!(results[1], Settlement::AlreadySettled);

        assert_eq!(store.task_earnings(&id("t")).unwrap(), payees);
        let balances: BTreeMap<String, i64> = store
            .balances()
            .unwrap()
            .into_iter()
            .map(|b| (b.account, b.balance))
            .collect();
        assert_eq!(balances[&client_account("alice")], -1_001);
        assert_eq!(balances[&node_account(&a)], 701);
        assert_eq!(balances[&node_account(&b)], 300);
        assert!(store.verify_ledger().unwrap().is_ok());
    }

    #[test]
    fn the_schema_refuses_a_second_credit_for_the_same_task_and_node() {
        let (_dir, mut store) = open();
        let node = NodeId([1; 16]);
        store.settle(&id("t"), "alice", &[(node, 10)]).unwrap();
        let err = store
            .conn
            .execute(
                "INSERT INTO ledger (seq, task_id, debit_account, credit_account, amount, hash)
                 VALUES (2, 't', 'client:alice', ?1, 10, zeroblob(32))",
                [node_account(&node)],
            )
            .unwrap_err();
        assert_eq!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::ConstraintViolation)
        );
    }

    #[test]
    fn the_books_balance_after_many_settlements() {
        let (_dir, mut store) = open();
        let nodes: Vec<NodeId> = (0..5u8).map(|i| NodeId([i; 16])).collect();
        let clients = ["alice", "bob", "carol|with|pipes"];
        let mut expected: BTreeMap<String, i64> = BTreeMap::new();
        let mut payouts = Vec::new();
        for i in 0..300u64 {
            let client = clients[i as usize % clients.len()];
            let payees: Vec<(NodeId, u64)> = (0..=(i % 3))
                .map(|k| (nodes[((i + k) % 5) as usize], 1_000 + i * 7 + k))
                .collect();
            for (node, amount) in &payees {
                *expected.entry(node_account(node)).or_default() += *amount as i64;
                *expected.entry(client_account(client)).or_default() -= *amount as i64;
            }
            let payout = Payout {
                task_id: id(&format!("task-{i}")),
                client: client.into(),
                payees,
            };
            if i % 2 == 0 {
                store
                    .settle(&payout.task_id, &payout.client, &payout.payees)
                    .unwrap();
            } else {
                payouts.push(payout);
            }
        }
        store.settle_many(&payouts).unwrap();

        let balances = store.balances().unwrap();
        let actual: BTreeMap<String, i64> = balances
            .iter()
            .map(|b| (b.account.clone(), b.balance))
            .collect();
        assert_eq!(actual, expected);
        assert_eq!(balances.iter().map(|b| b.balance).sum::<i64>(), 0);
        let check = store.verify_ledger().unwrap();
        assert!(check.is_ok(), "{check:?}");
        assert_eq!(check.entries, (0..300).map(|i| i % 3 + 1).sum::<u64>());
        assert_eq!(store.ledger(1).unwrap()[0].hash, check.head);
    }

    #[test]
    fn tampering_with_an_entrys_amount_is_detected_at_that_entry() {
        let (_dir, mut store) = open();
        for i in 0..10 {
            store
                .settle(&id(&format!("t{i}")), "alice", &[(NodeId([9; 16]), 100)])
                .unwrap();
        }
        assert!(store.verify_ledger().unwrap().is_ok());
        // The trigger stops an honest mistake; someone editing the file drops it first.
        let err = store
            .conn
            .execute("UPDATE ledger SET amount = 1 WHERE seq = 4", []);
        assert!(err.is_err(), "the ledger is append-only");
        store
            .conn
            .execute_batch(
                "DROP TRIGGER ledger_no_update;
                 UPDATE ledger SET amount = 100000 WHERE seq = 4;",
            )
            .unwrap();
        let check = store.verify_ledger().unwrap();
        assert_eq!(check.first_bad_entry, Some(4));
        assert!(!check.is_ok());
        assert_eq!(check.entries, 10);
    }

    #[test]
    fn deleting_an_entry_from_the_middle_is_detected_after_the_gap() {
        let (_dir, mut store) = open();
        for i in 0..5 {
            store
                .settle(&id(&format!("t{i}")), "alice", &[(NodeId([9; 16]), 100)])
                .unwrap();
        }
        store
            .conn
            .execute_batch("DROP TRIGGER ledger_no_delete; DELETE FROM ledger WHERE seq = 2;")
            .unwrap();
        let check = store.verify_ledger().unwrap();
        assert_eq!(check.first_bad_entry, Some(3));
    }

    #[test]
    fn a_node_listed_twice_among_the_payees_is_refused_and_nothing_is_written() {
        let (_dir, mut store) = open();
        let node = NodeId([1; 16]);
        let err = store
            .settle(
                &id("t"),
                "alice",
                &[(node, 1), (NodeId([2; 16]), 1), (node, 1)],
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::DuplicatePayee { .. }), "{err:?}");
        let err = store
            .settle(&id("t"), "alice", &[(node, u64::MAX)])
            .unwrap_err();
        assert!(matches!(err, StoreError::OutOfRange { .. }), "{err:?}");
        assert_eq!(store.verify_ledger().unwrap().entries, 0);
        assert!(store.balances().unwrap().is_empty());
    }

    #[test]
    fn an_empty_ledger_verifies_with_a_zero_head() {
        let (_dir, store) = open();
        let check = store.verify_ledger().unwrap();
        assert_eq!(
            check,
            LedgerCheck {
                entries: 0,
                head: Digest([0; 32]),
                balanced: true,
                first_bad_entry: None
            }
        );
        assert!(check.is_ok());
    }

    #[test]
    fn a_ledger_entry_serializes_its_hash_as_hex() {
        let entry = LedgerEntry {
            seq: 1,
            task_id: id("t"),
            debit_account: client_account("a"),
            credit_account: node_account(&NodeId([0; 16])),
            amount: 5,
            hash: Digest([0xab; 32]),
        };
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(json["hash"], "ab".repeat(32));
        assert_eq!(json["amount"], 5);
    }
}
