//! The dispatcher's unit tests: every input driven by hand, no SQLite file and no broker.

use super::*;
use crate::{Enrollment, RegistryConfig};
use ambient_core::{
    Engine, Identity, Ping, Receipt, SafetyPolicy, ScoreConfig, SignedTelemetry, Telemetry,
    TelemetrySample, sign_message,
};
use std::cell::RefCell;
use std::collections::HashSet;

use crate::sim::{MODULE, announce_frame, report_frame, telemetry_frame};

/// The journal in memory: what `Store::apply` would have committed.
#[derive(Default)]
struct Mem {
    tasks: RefCell<HashMap<TaskId, Known>>,
    paid: RefCell<HashMap<TaskId, Vec<(NodeId, u64)>>>,
    dispatches: RefCell<Vec<(TaskId, u16, NodeId)>>,
    pending: RefCell<Vec<([u8; 32], Vec<u8>)>>,
}

impl Journal for Mem {
    fn known(&self, task_id: &TaskId) -> Result<Option<Known>, StoreError> {
        Ok(self.tasks.borrow().get(task_id).cloned())
    }
}

impl Mem {
    fn commit(&self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Insert(t) => {
                    self.tasks
                        .borrow_mut()
                        .entry(t.task_id.clone())
                        .or_insert(Known {
                            spec_json: t.spec_json.clone(),
                            result_json: None,
                        });
                }
                Op::Dispatch {
                    task_id,
                    attempt,
                    node,
                    ..
                } => self
                    .dispatches
                    .borrow_mut()
                    .push((task_id.clone(), *attempt, *node)),
                Op::Settle {
                    task_id, payees, ..
                } => {
                    let mut paid = self.paid.borrow_mut();
                    assert!(!paid.contains_key(task_id), "{task_id} settled twice");
                    paid.insert(task_id.clone(), payees.clone());
                }
                Op::Finish {
                    task_id,
                    result_json,
                    ..
                } => {
                    let mut tasks = self.tasks.borrow_mut();
                    let known = tasks.get_mut(task_id).expect("finished task was inserted");
                    assert!(known.result_json.is_none(), "{task_id} finished twice");
                    known.result_json = Some(result_json.clone());
                }
                Op::Pending {
                    public_key, frame, ..
                } => self.pending.borrow_mut().push((*public_key, frame.clone())),
                Op::PutModule { .. } | Op::SaveNodes { .. } => {}
            }
        }
    }

    fn recovered(&self) -> Recovered {
        let tasks = self.tasks.borrow();
        let mut unfinished: Vec<JournaledTask> = tasks
            .iter()
            .filter(|(_, k)| k.result_json.is_none())
            .map(|(id, k)| {
                let dispatches: Vec<(u16, NodeId)> = self
                    .dispatches
                    .borrow()
                    .iter()
                    .filter(|(t, _, _)| t == id)
                    .map(|(_, a, n)| (*a, *n))
                    .collect();
                JournaledTask {
                    task_id: id.clone(),
                    client: "anonymous".into(),
                    spec_json: k.spec_json.clone(),
                    attempts: dispatches.iter().map(|d| d.0).max().unwrap_or(0),
                    submitted_ms: 1,
                    dispatches,
                }
            })
            .collect();
        unfinished.sort_by(|a, b| a.task_id.as_str().cmp(b.task_id.as_str()));
        Recovered {
            tasks: unfinished,
            modules: vec![sha3_256(MODULE)],
            finished: Vec::new(),
        }
    }
}

struct Fixture {
    d: Dispatcher,
    now: Now,
    nodes: Vec<Identity>,
    journal: Mem,
}

/// The coordinator's signing key in these tests.
fn coordinator() -> Identity {
    Identity::from_secret(&[0xC0; 32])
}

fn registry() -> Registry {
    Registry::new(RegistryConfig {
        // Long enough that nodes stay live across the simulated timeouts below.
        liveness: Duration::from_secs(3600),
        score: ScoreConfig::default(),
        safety: SafetyPolicy::default(),
        enrollment: Enrollment::Open,
        // Every node proven from the start: tests of trust use `trusting` below.
        trust_after: 0,
        ..RegistryConfig::default()
    })
}

/// `n` nodes that must agree with others `trust_after` times before running unchecked.
fn trusting(n: u8, trust_after: u32, spot_check_permille: u16) -> Fixture {
    let registry = Registry::new(RegistryConfig {
        liveness: Duration::from_secs(3600),
        trust_after,
        ..RegistryConfig::default()
    });
    fixture_in(
        registry,
        n,
        DispatchConfig {
            spot_check_permille,
            ..config()
        },
    )
}

fn config() -> DispatchConfig {
    DispatchConfig {
        spot_check_permille: 0,
        queue_timeout: Duration::from_secs(10),
        ..DispatchConfig::default()
    }
}

fn fixture(n: u8) -> Fixture {
    fixture_with(n, config())
}

fn fixture_with(n: u8, config: DispatchConfig) -> Fixture {
    fixture_in(registry(), n, config)
}

fn fixture_in(registry: Registry, n: u8, config: DispatchConfig) -> Fixture {
    let now = Now {
        at: Instant::now(),
        unix_ms: 1_700_000_000_000,
    };
    let d = Dispatcher::recover(
        config,
        registry,
        coordinator(),
        Recovered::default(),
        now,
        7,
    );
    let mut f = Fixture {
        d,
        now,
        nodes: Vec::new(),
        journal: Mem::default(),
    };
    for i in 1..=n {
        f.join(Identity::from_secret(&[i; 32]), "aarch64");
    }
    f
}

impl Fixture {
    /// One loop turn: handle, commit, return what was decided.
    fn step(&mut self, input: Input<'_>) -> Effects {
        let mut fx = Effects::default();
        self.d.handle(self.now, input, &self.journal, &mut fx);
        self.d.seal(&mut fx);
        self.journal.commit(&fx.journal);
        fx
    }

    fn advance(&mut self, by: Duration) -> Effects {
        self.now.at += by;
        self.now.unix_ms += by.as_millis() as u64;
        self.step(Input::Tick)
    }

    fn join(&mut self, id: Identity, arch: &str) {
        self.join_with(id, arch, 4);
    }

    /// [`Fixture::join`] with `slots` tasks at once.
    fn join_with(&mut self, id: Identity, arch: &str, slots: u16) {
        let node = id.node_id();
        let i = self.nodes.len() as u32;
        self.frame(node, NodeTopic::Status, b"online");
        self.frame(node, NodeTopic::Announce, &announce_frame(&id, arch, slots));
        let sample = TelemetrySample {
            cpu_load_permille: Some(100),
            mem_free_bytes: Some(4 << 30),
            ..TelemetrySample::default()
        };
        self.frame(node, NodeTopic::Telemetry, &telemetry_frame(&id, 1, sample));
        self.nodes.push(id);
        // Distinct round trips of the coordinator's first probe make the weighted order
        // deterministic: node 0 is best.
        let probes = self.step(Input::Probes);
        self.answer_probes(&probes, Duration::from_millis(u64::from(i) + 1));
    }

    /// Answers every probe in `fx` with its node's signed pong, received `after` it was sent.
    fn answer_probes(&mut self, fx: &Effects, after: Duration) {
        for p in &fx.dispatch {
            let Some((node, NodeTopic::Tasks)) = topics::parse_node(&p.topic) else {
                continue;
            };
            let Ok(Message::Probe(probe)) = Envelope::decode(&p.payload).map(|e| e.message) else {
                continue;
            };
            let pong = Pong::sign(self.identity(node), &node, probe.nonce);
            let frame = Envelope::new(Message::Pong(pong)).to_vec();
            let received = self.now.at + after;
            self.step(Input::Frame(Frame {
                node,
                leaf: NodeTopic::Telemetry,
                frame: &frame,
                received,
                signed_by: None,
            }));
        }
    }

    fn frame(&mut self, node: NodeId, leaf: NodeTopic, frame: &[u8]) -> Effects {
        let received = self.now.at;
        self.step(Input::Frame(Frame {
            node,
            leaf,
            frame,
            received,
            signed_by: None,
        }))
    }

    /// A result from `node`, with the service's evidence that its signature was checked.
    fn vouched_frame(&mut self, node: NodeId, frame: &[u8], signed_by: Option<Checked>) -> Effects {
        let received = self.now.at;
        self.step(Input::Frame(Frame {
            node,
            leaf: NodeTopic::Results,
            frame,
            received,
            signed_by,
        }))
    }

    fn submit_json(&mut self, json: serde_json::Value) -> Effects {
        let bytes = json.to_string().into_bytes();
        self.step(Input::Submit(&bytes))
    }

    fn submit(&mut self, id: &str, verify: &str) -> Effects {
        self.submit_json(serde_json::json!({"task_id": id, "module_b64": B64.encode(MODULE), "input": "in", "verify": verify}))
    }

    fn identity(&self, node: NodeId) -> &Identity {
        self.nodes.iter().find(|i| i.node_id() == node).unwrap()
    }

    /// A report for (task, attempt) on `node`, signed by `signer`.
    fn report(
        &self,
        task: &str,
        sent: (NodeId, u16),
        output: &[u8],
        exit: Exit,
        signer: &Identity,
    ) -> Vec<u8> {
        self.report_claiming(task, sent, output, exit, signer, |_| {})
    }

    /// As [`Fixture::report`], with the receipt changed by `lie` before it is signed.
    fn report_claiming(
        &self,
        task: &str,
        (node, attempt): (NodeId, u16),
        output: &[u8],
        exit: Exit,
        signer: &Identity,
        lie: impl FnOnce(&mut Receipt),
    ) -> Vec<u8> {
        let mut receipt = Receipt {
            task_id: TaskId::new(task).unwrap(),
            attempt,
            node,
            module: sha3_256(MODULE),
            input: sha3_256(b"in"),
            output: sha3_256(output),
            fuel_used: 100,
            limits: ambient_core::Limits::default(),
            engine: Engine::Wasmtime,
            exit,
        };
        lie(&mut receipt);
        report_frame(signer, receipt, output)
    }

    fn answer(&mut self, task: &str, sent: (NodeId, u16), output: &[u8]) -> Effects {
        self.answer_with(task, sent, output, Exit::Ok)
    }

    fn answer_with(
        &mut self,
        task: &str,
        sent: (NodeId, u16),
        output: &[u8],
        exit: Exit,
    ) -> Effects {
        let frame = self.report(task, sent, output, exit, self.identity(sent.0));
        self.frame(sent.0, NodeTopic::Results, &frame)
    }

    /// The node's signed refusal of (task, attempt).
    fn refusal(&self, task: &str, (node, attempt): (NodeId, u16), why: Refusal) -> Vec<u8> {
        let task_id = TaskId::new(task).unwrap();
        let body = ReportBody::Refused(SignedRefusal::sign(
            self.identity(node),
            &task_id,
            attempt,
            &node,
            why,
        ));
        Envelope::new(Message::Report(Report {
            task_id,
            attempt,
            node,
            body,
        }))
        .to_vec()
    }
}

/// The assignments among `fx.dispatch`, as (node, attempt).
fn assignments(fx: &Effects) -> Vec<(NodeId, u16)> {
    fx.dispatch
        .iter()
        .filter_map(|p| {
            let (node, leaf) = topics::parse_node(&p.topic)?;
            match (leaf, Envelope::decode(&p.payload).ok()?.message) {
                (NodeTopic::Tasks, Message::Assign(a)) => Some((node, a.attempt)),
                _ => None,
            }
        })
        .collect()
}

/// The task events among `fx.events` (notices are not task events).
fn events(fx: &Effects) -> Vec<(String, TaskEvent)> {
    fx.events
        .iter()
        .filter(|p| p.topic != topics::NOTICES)
        .map(|p| (p.topic.clone(), serde_json::from_slice(&p.payload).unwrap()))
        .collect()
}

fn finals(fx: &Effects) -> Vec<TaskEvent> {
    events(fx)
        .into_iter()
        .filter(|(topic, e)| topic.ends_with("/result") && e.status.is_final())
        .map(|(_, e)| e)
        .collect()
}

fn error_message(ev: &TaskEvent) -> String {
    ev.error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default()
}

#[test]
fn an_accepted_event_waits_for_the_commit_while_the_assignment_may_leave_at_once() {
    let mut f = fixture(1);
    let fx = f.submit("t0", "receipt");
    assert_eq!(assignments(&fx).len(), 1, "dispatch goes before the commit");
    assert!(matches!(
        fx.journal[..],
        [Op::PutModule { .. }, Op::Insert(_), Op::Dispatch { .. }]
    ));
    let evs = events(&fx);
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].1.status, EventStatus::Accepted);
    assert!(
        fx.dispatch.iter().all(|p| !p.topic.ends_with("/result")),
        "no task event leaves before the commit"
    );
}

#[test]
fn a_verified_result_is_delivered_and_paid_once_and_its_replay_is_dropped() {
    let mut f = fixture(1);
    let sent = assignments(&f.submit("t1", "receipt"));
    assert_eq!(sent.len(), 1);
    let done = finals(&f.answer("t1", sent[0], b"out"));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, EventStatus::Completed);
    assert_eq!(
        done[0].output_b64.as_deref(),
        Some(B64.encode(b"out").as_str())
    );
    assert!(finals(&f.answer("t1", sent[0], b"out")).is_empty());
    assert_eq!(f.d.dropped().stale_reports, 1);
    let paid = f.journal.paid.borrow();
    assert_eq!(paid[&TaskId::new("t1").unwrap()].len(), 1);
    assert_eq!(done[0].reward, Some(paid[&TaskId::new("t1").unwrap()][0].1));
}

#[test]
fn every_assignment_is_signed_by_the_coordinator_for_its_node() {
    let mut f = fixture(2);
    let fx = f.submit("signed", "replicate:2");
    assert_eq!(assignments(&fx).len(), 2);
    for p in &fx.dispatch {
        let Some((node, NodeTopic::Tasks)) = topics::parse_node(&p.topic) else {
            continue;
        };
        let Message::Assign(a) = Envelope::decode(&p.payload).unwrap().message else {
            panic!("not an assignment");
        };
        assert_eq!(a.coordinator, coordinator().public_key());
        assert_eq!(a.verify(&node, &sha3_256(a.input)), Ok(()));
    }
}

/// One turn of `n` submissions, sealed: what it sends, by node.
fn one_turn(f: &mut Fixture, n: usize) -> HashMap<NodeId, Vec<Assignment<'static>>> {
    let mut fx = Effects::default();
    for i in 0..n {
        let json = serde_json::json!({"task_id": format!("t{i}"), "module_b64": B64.encode(MODULE), "input": "in", "verify": "receipt"});
        let bytes = json.to_string().into_bytes();
        f.d.handle(f.now, Input::Submit(&bytes), &f.journal, &mut fx);
    }
    assert!(
        assignments(&fx).is_empty(),
        "nothing is signed before the turn ends"
    );
    f.d.seal(&mut fx);
    let mut by_node: HashMap<NodeId, Vec<Assignment<'static>>> = HashMap::new();
    for p in &fx.dispatch {
        if let (Some((node, NodeTopic::Tasks)), Ok(Message::Assign(a))) = (
            topics::parse_node(&p.topic),
            Envelope::decode(&p.payload).map(|e| e.message),
        ) {
            assert_eq!(a.verify(&node, &sha3_256(a.input)), Ok(()));
            let a = Assignment { input: b"in", ..a };
            by_node.entry(node).or_default().push(a);
        }
    }
    by_node
}

#[test]
fn a_turn_places_at_most_sixteen_assignments_under_one_signature() {
    let mut f = fixture(0);
    f.join_with(Identity::from_secret(&[1; 32]), "aarch64", 20);
    let by_node = one_turn(&mut f, 20);
    let sent = by_node.values().next().unwrap();
    assert_eq!(sent.len(), 20);
    let sizes: Vec<usize> = sent.iter().map(|a| a.batch.len()).collect();
    assert_eq!(sizes, [[16; 16].as_slice(), &[4; 4]].concat());
    assert_ne!(sent[0].signature, sent[16].signature);
}

#[test]
fn the_assignments_one_turn_places_on_a_node_go_out_under_one_signature() {
    let mut f = fixture(2);
    // One turn of six submissions: both nodes take up to four tasks at once.
    let by_node = one_turn(&mut f, 6);
    assert_eq!(
        by_node.values().map(Vec::len).sum::<usize>(),
        6,
        "{by_node:?}"
    );
    for (node, sent) in &by_node {
        let first = &sent[0];
        assert_eq!(first.batch.len(), sent.len(), "one batch per node and turn");
        for a in sent {
            assert_eq!(
                (&a.batch, a.signature),
                (&first.batch, first.signature),
                "{node}"
            );
        }
    }
}

#[test]
fn a_report_forged_with_another_key_changes_nothing_and_the_real_one_is_accepted() {
    let mut f = fixture(2);
    let first = assignments(&f.submit("t2", "receipt"))[0];
    let forger = Identity::from_secret(&[0xEE; 32]);
    let forged = f.report("t2", first, b"forged", Exit::Ok, &forger);
    let refusal = {
        let mut honest = f.refusal("t2", first, Refusal::ModuleUnavailable);
        let n = honest.len();
        honest[n - 1] ^= 1;
        honest
    };
    for frame in [&forged, &refusal] {
        let fx = f.frame(first.0, NodeTopic::Results, frame);
        assert!(fx.dispatch.is_empty() && fx.events.is_empty(), "{fx:?}");
    }
    assert_eq!(f.d.dropped().unauthenticated, 2);
    let view = f.d.registry().view(f.now.at, &first.0).unwrap();
    assert_eq!(
        (view.reputation.disputed, view.reputation.failed),
        (0, 0),
        "nothing held against the node the forger named"
    );
    let done = finals(&f.answer("t2", first, b"out"));
    assert_eq!(done.len(), 1, "the attempt was still outstanding");
    assert_eq!(done[0].status, EventStatus::Completed);
}

/// What [`Signers::check`] returns for the receipt in `frame` once it verified under `key`.
fn vouched(frame: &[u8], key: [u8; 32]) -> Option<Checked> {
    let Ok(Message::Report(r)) = Envelope::decode(frame).map(|e| e.message) else {
        panic!("not a report");
    };
    let ReportBody::Executed { receipt, .. } = &r.body else {
        panic!("not an executed report");
    };
    Some(Checked::assume(key, receipt))
}

#[test]
fn a_receipt_vouched_for_under_another_key_or_for_another_receipt_is_checked_again_and_a_forgery_dropped()
 {
    let mut f = fixture(2);
    let first = assignments(&f.submit("pre", "receipt"))[0];
    let key = f.identity(first.0).public_key();
    let forger = Identity::from_secret(&[0xEE; 32]);
    let forged = f.report("pre", first, b"forged", Exit::Ok, &forger);
    let honest = f.report("pre", first, b"out", Exit::Ok, f.identity(first.0));
    // Vouched for under the forger's key, or under the node's key for another receipt.
    for signed_by in [vouched(&forged, forger.public_key()), vouched(&honest, key)] {
        let fx = f.vouched_frame(first.0, &forged, signed_by);
        assert!(fx.dispatch.is_empty() && fx.events.is_empty(), "{fx:?}");
    }
    assert_eq!(f.d.dropped().unauthenticated, 2);
    // Vouched for under the registered key: accepted without a second check, its claims
    // still checked.
    let lying = f.report_claiming("pre", first, b"out", Exit::Ok, f.identity(first.0), |r| {
        r.input = sha3_256(b"another input")
    });
    let next = assignments(&f.vouched_frame(first.0, &lying, vouched(&lying, key)));
    assert_eq!(
        f.d.dropped().bad_receipts,
        1,
        "a signed false claim is a dispute"
    );
    let honest = f.report("pre", next[0], b"out", Exit::Ok, f.identity(next[0].0));
    let checked = vouched(&honest, f.identity(next[0].0).public_key());
    let done = finals(&f.vouched_frame(next[0].0, &honest, checked));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, EventStatus::Completed);
}

#[test]
fn a_receipt_the_node_signed_with_false_claims_is_a_dispute_and_the_task_moves_on() {
    let mut f = fixture(2);
    let first = assignments(&f.submit("t2b", "receipt"))[0];
    let signer = f.identity(first.0);
    let frame = f.report_claiming("t2b", first, b"out", Exit::Ok, signer, |r| {
        r.input = sha3_256(b"another input");
    });
    let next = assignments(&f.frame(first.0, NodeTopic::Results, &frame));
    assert_eq!(f.d.dropped().bad_receipts, 1);
    let view = f.d.registry().view(f.now.at, &first.0).unwrap();
    assert_eq!(view.reputation.disputed, 1);
    assert_eq!(next.len(), 1);
    assert_ne!(next[0].0, first.0, "retried on another node");
    assert_eq!(next[0].1, first.1 + 1, "with the next attempt number");
}

#[test]
fn a_node_that_sent_a_bad_receipt_is_never_asked_again_for_that_task() {
    let mut f = fixture(1);
    let first = assignments(&f.submit("t2c", "receipt"))[0];
    let signer = f.identity(first.0);
    let frame = f.report_claiming("t2c", first, b"out", Exit::Ok, signer, |r| {
        r.fuel_used = u64::MAX;
    });
    assert!(assignments(&f.frame(first.0, NodeTopic::Results, &frame)).is_empty());
    assert_eq!(f.d.queued(), 1);
}

#[test]
fn a_dispatch_that_times_out_is_reassigned_with_the_next_attempt() {
    let mut f = fixture(2);
    let first = assignments(&f.submit("t3", "receipt"))[0];
    let wait =
        Duration::from_millis(ambient_core::Limits::default().timeout_ms) + Duration::from_secs(16);
    let next = assignments(&f.advance(wait));
    assert_eq!(next.len(), 1);
    assert_ne!(next[0].0, first.0);
    // The slow node's answer to the old attempt now arrives: it is stale.
    assert!(finals(&f.answer("t3", first, b"out")).is_empty());
    assert_eq!(f.d.dropped().stale_reports, 1);
}

#[test]
fn a_task_whose_attempts_all_time_out_fails_with_every_reason() {
    let mut f = fixture(1);
    let mut sent = assignments(&f.submit("loop", "receipt"))[0];
    let mut done = Vec::new();
    for round in 0..10 {
        let fx = f.answer_with("loop", sent, b"", Exit::TimedOut);
        done = finals(&fx);
        if !done.is_empty() {
            assert_eq!(round, 3, "max_failures 3: the fourth failure ends it");
            break;
        }
        let next = assignments(&fx);
        assert_eq!(next.len(), 1, "the only node is reused after a timeout");
        assert_eq!(next[0].0, sent.0);
        sent = next[0];
    }
    assert_eq!(done.len(), 1, "the task ended");
    assert_eq!(done[0].status, EventStatus::Failed);
    let message = error_message(&done[0]);
    assert!(message.starts_with("4 attempts failed"), "{message}");
    assert_eq!(message.matches("timed out on node").count(), 4, "{message}");
    assert_eq!(f.d.unfinished(), 0);
}

#[test]
fn disagreeing_replicas_escalate_and_the_minority_is_disputed() {
    let mut f = fixture(5);
    let sent = assignments(&f.submit("t4", "replicate:2"));
    assert_eq!(sent.len(), 2, "two distinct nodes");
    assert_ne!(sent[0].0, sent[1].0);
    assert!(finals(&f.answer("t4", sent[0], b"right")).is_empty());
    let more = assignments(&f.answer("t4", sent[1], b"wrong"));
    assert_eq!(
        more.len(),
        3,
        "a 1-1 split escalates to five: four to one would decide"
    );
    assert!(finals(&f.answer("t4", more[0], b"right")).is_empty());
    assert!(
        finals(&f.answer("t4", more[1], b"right")).is_empty(),
        "3 to 1 is contested"
    );
    let done = finals(&f.answer("t4", more[2], b"right"));
    assert_eq!(done.len(), 1, "4 to 1 leads by three");
    let verdict = done[0].verdict.clone().unwrap();
    assert_eq!((verdict.replicas, verdict.agreeing), (5, 4));
    assert_eq!(verdict.disputed, vec![sent[1].0.to_hex().to_string()]);
    assert_eq!(
        f.journal.paid.borrow()[&TaskId::new("t4").unwrap()].len(),
        4
    );
}

/// Answers every assignment of `task` until it ends, each node with `answer(node, n)`
/// where `n` counts the assignments so far; returns the final event.
fn run_to_end(
    f: &mut Fixture,
    task: &str,
    verify: &str,
    mut answer: impl FnMut(NodeId, usize) -> &'static [u8],
) -> TaskEvent {
    let mut sent = assignments(&f.submit(task, verify));
    let mut n = 0;
    while let Some(s) = sent.pop() {
        let fx = f.answer(task, s, answer(s.0, n));
        n += 1;
        if let Some(done) = finals(&fx).pop() {
            return done;
        }
        sent.extend(assignments(&fx));
    }
    panic!("{task} did not end after {n} answers");
}

#[test]
fn a_split_vote_in_a_pool_of_two_fails_at_once_naming_the_pool() {
    let mut f = fixture(2);
    let sent = assignments(&f.submit("pair", "replicate:2"));
    f.answer("pair", sent[0], b"x");
    let done = finals(&f.answer("pair", sent[1], b"y"));
    assert_eq!(
        done.len(),
        1,
        "no third node will come: no waiting out the queue"
    );
    let message = error_message(&done[0]);
    assert!(
        message.contains("only 2 nodes can run the task"),
        "{message}"
    );
}

#[test]
fn in_a_pool_of_three_a_liar_is_outvoted_two_to_one() {
    let mut f = fixture(3);
    let sent = assignments(&f.submit("shelf", "replicate:2"));
    f.answer("shelf", sent[0], b"right");
    let third = assignments(&f.answer("shelf", sent[1], b"wrong"));
    assert_eq!(
        third.len(),
        1,
        "three nodes: a third replica is all there is"
    );
    let done = finals(&f.answer("shelf", third[0], b"right"));
    let verdict = done[0].verdict.clone().unwrap();
    assert_eq!((verdict.replicas, verdict.agreeing), (3, 2));
    assert_eq!(verdict.disputed, vec![sent[1].0.to_hex().to_string()]);
}

#[test]
fn two_colluders_outvoting_an_honest_node_two_to_one_do_not_get_it_disputed() {
    let mut f = fixture(7);
    let mut colluders = Vec::new();
    let mut honest = Vec::new();
    // The first two runs disagree, the first escalation lands on a second colluder.
    let done = run_to_end(&mut f, "c", "replicate:2", |node, n| {
        if n == 0 || n == 2 {
            colluders.push(node);
            b"lie"
        } else {
            honest.push(node);
            b"right"
        }
    });
    assert_eq!(
        done.output_b64.as_deref(),
        Some(B64.encode(b"right").as_str())
    );
    let verdict = done.verdict.clone().unwrap();
    assert_eq!(
        (verdict.replicas, verdict.agreeing),
        (7, 5),
        "5 to 2 leads by three"
    );
    let mut disputed = verdict.disputed.clone();
    let mut liars: Vec<String> = colluders.iter().map(|c| c.to_hex().to_string()).collect();
    disputed.sort();
    liars.sort();
    assert_eq!(disputed, liars);
    for h in honest {
        let view = f.d.registry.view(f.now.at, &h).unwrap();
        assert_eq!(view.blacklisted_for_ms, None);
    }
}

#[test]
fn a_vote_seven_replicas_can_no_longer_decide_fails_and_disputes_no_one() {
    let mut f = fixture(9);
    let done = run_to_end(&mut f, "split", "replicate:2", |_, n| {
        if n % 2 == 0 { b"a" } else { b"b" }
    });
    assert_eq!(done.status, EventStatus::Failed);
    let message = error_message(&done);
    assert!(message.contains("6 replicas disagreed"), "{message}");
    assert!(message.contains("within 7 replicas"), "{message}");
    assert!(f.journal.paid.borrow().is_empty(), "nothing paid");
    for n in &f.nodes {
        let view = f.d.registry.view(f.now.at, &n.node_id()).unwrap();
        assert_eq!(view.blacklisted_for_ms, None, "no one disputed");
    }
}

fn reputation(f: &Fixture, node: NodeId) -> ambient_core::Reputation {
    f.d.registry.view(f.now.at, &node).unwrap().reputation
}

#[test]
fn a_new_nodes_receipt_tasks_are_checked_until_it_has_agreed_enough_times_in_a_row() {
    let mut f = trusting(2, 3, 0);
    for i in 0..3 {
        let id = format!("prove{i}");
        let sent = assignments(&f.submit(&id, "receipt"));
        assert_eq!(sent.len(), 2, "task {i}: an unproven node's run is checked");
        f.answer(&id, sent[0], b"same");
        let done = finals(&f.answer(&id, sent[1], b"same"));
        assert_eq!(done[0].verdict.as_ref().unwrap().agreeing, 2);
    }
    let sent = assignments(&f.submit("proven", "receipt"));
    assert_eq!(sent.len(), 1, "proven after 3 agreements: runs unchecked");
    assert_eq!(
        f.d.registry
            .view(f.now.at, &sent[0].0)
            .unwrap()
            .agreed_in_a_row,
        3
    );
}

#[test]
fn under_an_error_rate_target_new_nodes_replicate_until_their_agreement_reaches_it() {
    let mut f = trusting(6, 40, 0);
    let mut answers = 0;
    let done = run_to_end(&mut f, "sure", "target:1e-3", |_, _| {
        answers += 1;
        b"same"
    });
    // Assumed one in five faulty: 2, 3 and 4 never-checked nodes agreeing leave 5.9e-2,
    // 1.5e-2 and 3.9e-3; five leave 9.7e-4.
    assert_eq!(answers, 5);
    let verdict = done.verdict.unwrap();
    assert_eq!(
        (verdict.agreeing, verdict.policy.as_str()),
        (5, "target:1e-3")
    );
    let bound = verdict.error_bound.unwrap();
    assert!(bound <= 1e-3 && bound > 9e-4, "{bound}");
}

#[test]
fn under_an_error_rate_target_runs_per_task_fall_as_nodes_agree_until_one_runs_alone() {
    let mut f = trusting(3, 40, 0);
    let mut runs = Vec::new();
    for i in 0..12 {
        let mut n = 0;
        let done = run_to_end(&mut f, &format!("t{i}"), "target:1e-2", |_, _| {
            n += 1;
            b"same"
        });
        runs.push(n);
        let bound = done.verdict.unwrap().error_bound.unwrap();
        if i == 0 {
            // Three never-checked nodes leave 1.5e-2: the pool has no fourth, so the
            // result is accepted with the bound it reached, above the target.
            assert!(bound > 1e-2 && bound < 2e-2, "{bound}");
        } else {
            assert!(bound <= 1e-2, "task {i}: {bound}");
        }
    }
    assert_eq!(runs[0], 3, "{runs:?}");
    assert!(runs.windows(2).all(|w| w[1] <= w[0]), "{runs:?}");
    // Alone once 0.2 / (0.8 · k · e) ≤ 1e-2, k ≥ 10.
    assert_eq!(*runs.last().unwrap(), 1, "{runs:?}");
}

#[test]
fn under_an_error_rate_target_a_result_two_nodes_agreed_on_stands_when_no_third_run_can_be_had() {
    let mut f = trusting(3, 40, 0);
    let sent = assignments(&f.submit("short", "target:1e-3"));
    assert_eq!(sent.len(), 2);
    f.answer("short", sent[0], b"same");
    let third = assignments(&f.answer("short", sent[1], b"same"));
    assert_eq!(
        third.len(),
        1,
        "two new nodes agreeing leave 5.9e-2: a third runs"
    );
    // The third node never answers: its run times out, and no other node is left.
    let mut done = Vec::new();
    for _ in 0..10 {
        done.extend(finals(&f.advance(Duration::from_secs(60))));
    }
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0].status, EventStatus::Completed);
    let verdict = done[0].verdict.as_ref().unwrap();
    assert_eq!(verdict.agreeing, 2);
    assert!(
        verdict.error_bound.unwrap() > 1e-3,
        "the bound it reached, above the target"
    );
}

#[test]
fn under_an_error_rate_target_a_lie_is_outvoted_and_its_node_disputed() {
    let mut f = trusting(7, 40, 0);
    let liar = f.nodes[0].node_id();
    let done = run_to_end(&mut f, "lie", "target:1e-2", |node, _| {
        if node == liar { b"wrong" } else { b"right" }
    });
    assert_eq!(
        done.output_b64.as_deref(),
        Some(B64.encode(b"right").as_str())
    );
    let verdict = done.verdict.unwrap();
    assert_eq!(verdict.disputed, vec![liar.to_hex().to_string()]);
    // A never-checked dissenter weighs: 4–1 leaves 1.9e-2, 5–1 4.9e-3.
    assert_eq!(verdict.agreeing, 5);
    assert!(verdict.error_bound.unwrap() <= 1e-2);
}

#[test]
fn a_node_caught_lying_gets_a_notice_published_for_each_result_that_rested_on_it_alone() {
    let mut f = fixture(3);
    let sent = assignments(&f.submit("solo", "receipt"));
    let liar = sent[0].0;
    assert!(
        finals(&f.answer("solo", sent[0], b"wrong"))[0]
            .verdict
            .is_some()
    );
    let sent = assignments(&f.submit("vote", "replicate:3"));
    let mut notices = Vec::new();
    for s in sent {
        let out: &[u8] = if s.0 == liar { b"lie" } else { b"right" };
        let fx = f.answer("vote", s, out);
        notices.extend(
            fx.events
                .iter()
                .filter(|p| p.topic == topics::NOTICES)
                .map(|p| serde_json::from_slice::<Notice>(&p.payload).unwrap()),
        );
    }
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].task_id, "solo");
    assert_eq!(notices[0].code, "suspect_result");
    assert_eq!(notices[0].node, liar.to_hex().to_string());
    // Told once: the list no longer holds it.
    let sent = assignments(&f.submit("again", "replicate:3"));
    for s in sent {
        let out: &[u8] = if s.0 == liar { b"lie" } else { b"right" };
        let fx = f.answer("again", s, out);
        assert!(fx.events.iter().all(|p| p.topic != topics::NOTICES));
    }
}

#[test]
fn a_result_that_rests_on_a_node_caught_while_it_ran_gets_its_notice_at_once() {
    let mut f = fixture(3);
    let solo = assignments(&f.submit("solo", "receipt"))[0];
    let liar = solo.0;
    for s in assignments(&f.submit("vote", "replicate:3")) {
        let out: &[u8] = if s.0 == liar { b"lie" } else { b"right" };
        f.answer("vote", s, out);
    }
    assert!(f.d.registry.blacklisted(&liar));
    let fx = f.answer("solo", solo, b"out");
    assert_eq!(finals(&fx).len(), 1);
    let notices: Vec<Notice> = fx
        .events
        .iter()
        .filter(|p| p.topic == topics::NOTICES)
        .map(|p| serde_json::from_slice(&p.payload).unwrap())
        .collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].task_id, "solo");
}

#[test]
fn a_node_caught_with_a_wrong_result_is_blacklisted_and_starts_proving_again() {
    let mut f = trusting(5, 0, 1000);
    let liar = f.nodes[0].node_id();
    let sent = assignments(&f.submit("caught", "receipt"));
    assert_eq!(sent.len(), 2, "spot-checked");
    let (on_liar, on_other) = if sent[0].0 == liar {
        (sent[0], sent[1])
    } else {
        (sent[1], sent[0])
    };
    f.answer("caught", on_liar, b"wrong");
    let third = assignments(&f.answer("caught", on_other, b"right"));
    assert_eq!(third.len(), 3, "disagreement escalates");
    f.answer("caught", third[0], b"right");
    f.answer("caught", third[1], b"right");
    let done = finals(&f.answer("caught", third[2], b"right"));
    assert_eq!(
        done[0].output_b64.as_deref(),
        Some(B64.encode(b"right").as_str())
    );
    let view = f.d.registry.view(f.now.at, &liar).unwrap();
    assert_eq!(view.agreed_in_a_row, 0);
    assert_eq!(view.blacklisted_for_ms, Some(3_600_000));
    for i in 0..5 {
        let sent = assignments(&f.submit(&format!("after{i}"), "receipt"));
        assert!(
            sent.iter().all(|(node, _)| *node != liar),
            "no work for a blacklisted node"
        );
        for s in sent {
            f.answer(&format!("after{i}"), s, b"ok");
        }
    }
}

/// The measurement that opened the trust work: 4 honest nodes and 1 that answers every
/// task at once with a validly signed receipt over a wrong output. With 5% random spot
/// checks alone it had a third of 400 results accepted; proving every node first catches
/// it on its first task.
#[test]
fn a_node_that_always_lies_gets_no_wrong_result_accepted() {
    let mut f = trusting(5, 10, 50);
    let liar = f.nodes[0].node_id();
    let mut wrong_accepted = 0;
    let mut executions = 0;
    for i in 0..400 {
        let id = format!("t{i}");
        let mut pending = assignments(&f.submit(&id, "receipt"));
        let mut done = Vec::new();
        while let Some(sent) = pending.pop() {
            executions += 1;
            let out: &[u8] = if sent.0 == liar { b"wrong" } else { b"right" };
            let fx = f.answer(&id, sent, out);
            pending.extend(assignments(&fx));
            done.extend(finals(&fx));
        }
        assert_eq!(done.len(), 1, "task {i} ended");
        if done[0].output_b64.as_deref() != Some(B64.encode(b"right").as_str()) {
            wrong_accepted += 1;
        }
    }
    println!(
        "400 tasks, 1 liar in 5: {wrong_accepted} wrong accepted, {executions} executions ({:.3}x)",
        f64::from(executions) / 400.0
    );
    assert_eq!(wrong_accepted, 0);
    // Each node's first 10 results are checked, then 5% at random.
    assert!(
        executions < 400 * 13 / 10,
        "{executions} executions for 400 tasks"
    );
    assert!(
        f.d.registry
            .view(f.now.at, &liar)
            .unwrap()
            .blacklisted_for_ms
            .is_some()
    );
}

#[test]
fn a_late_replica_that_disagrees_with_a_decisive_majority_is_disputed() {
    let mut f = fixture(7);
    let sent = assignments(&f.submit("late7", "replicate:7"));
    assert_eq!(sent.len(), 7);
    for s in &sent[..3] {
        assert!(finals(&f.answer("late7", *s, b"right")).is_empty());
    }
    let done = finals(&f.answer("late7", sent[3], b"right"));
    assert_eq!(done.len(), 1, "four of seven is a majority: accepted");
    let before = reputation(&f, sent[4].0);
    assert!(finals(&f.answer("late7", sent[4], b"wrong")).is_empty());
    assert_eq!(
        reputation(&f, sent[4].0).disputed,
        before.disputed + 1,
        "4 to 1 leads by three: compared, not dropped as stale"
    );
    assert_eq!(f.d.dropped().stale_reports, 0);
    // The same report again is a duplicate: stale, and not held against the node twice.
    f.answer("late7", sent[4], b"wrong");
    assert_eq!(f.d.dropped().stale_reports, 1);
    assert_eq!(reputation(&f, sent[4].0).disputed, before.disputed + 1);
    // A second dissent leaves a lead of two: contested, let go.
    let before = reputation(&f, sent[5].0);
    f.answer("late7", sent[5], b"wrong");
    assert_eq!(reputation(&f, sent[5].0).disputed, before.disputed);
}

#[test]
fn a_late_replica_outvoted_two_to_one_is_not_disputed() {
    let mut f = fixture(7);
    let sent = assignments(&f.submit("late3", "replicate:3"));
    f.answer("late3", sent[0], b"lie");
    let done = finals(&f.answer("late3", sent[1], b"lie"));
    assert_eq!(done.len(), 1, "two of three, unanimous so far: accepted");
    f.answer("late3", sent[2], b"right");
    let view = f.d.registry.view(f.now.at, &sent[2].0).unwrap();
    assert_eq!(view.reputation.disputed, 0);
    assert_eq!(view.blacklisted_for_ms, None);
}

#[test]
fn a_late_replica_that_agrees_counts_as_verified_for_its_node() {
    let mut f = fixture(3);
    let sent = assignments(&f.submit("late-ok", "replicate:3"));
    f.answer("late-ok", sent[0], b"same");
    assert_eq!(finals(&f.answer("late-ok", sent[1], b"same")).len(), 1);
    let before = reputation(&f, sent[2].0);
    f.answer("late-ok", sent[2], b"same");
    let after = reputation(&f, sent[2].0);
    assert_eq!(after.verified, before.verified + 1);
    assert_eq!(after.disputed, before.disputed);
}

#[test]
fn a_replica_placed_in_the_turn_its_task_finishes_is_still_sent() {
    let mut f = fixture(4);
    let sent = assignments(&f.submit("same-turn", "replicate:3"));
    // One turn: the first node refuses (its replacement goes to the fourth), then the other
    // two agree, which finishes the task while the replacement is not yet signed.
    let frames = [
        (sent[0].0, f.refusal("same-turn", sent[0], Refusal::Busy)),
        (
            sent[1].0,
            f.report(
                "same-turn",
                sent[1],
                b"same",
                Exit::Ok,
                f.identity(sent[1].0),
            ),
        ),
        (
            sent[2].0,
            f.report(
                "same-turn",
                sent[2],
                b"same",
                Exit::Ok,
                f.identity(sent[2].0),
            ),
        ),
    ];
    let mut fx = Effects::default();
    for (node, frame) in &frames {
        let input = Input::Frame(Frame {
            node: *node,
            leaf: NodeTopic::Results,
            frame,
            received: f.now.at,
            signed_by: None,
        });
        f.d.handle(f.now, input, &f.journal, &mut fx);
    }
    assert_eq!(finals(&fx).len(), 1, "{fx:?}");
    f.d.seal(&mut fx);
    let late: Vec<(NodeId, u16)> = assignments(&fx);
    assert_eq!(late.len(), 1, "the replacement replica goes out: {late:?}");
    assert!(!sent.iter().any(|(node, _)| *node == late[0].0));
}

#[test]
fn late_replicas_are_forgotten_once_they_can_no_longer_report() {
    let mut f = fixture(3);
    let sent = assignments(&f.submit("gone", "replicate:3"));
    f.answer("gone", sent[0], b"x");
    f.answer("gone", sent[1], b"x");
    assert_eq!(f.d.late.len(), 1);
    let wait =
        Duration::from_millis(ambient_core::Limits::default().timeout_ms) + config().dispatch_grace;
    f.advance(wait);
    assert!(f.d.late.is_empty(), "expired with its deadline");
    f.answer("gone", sent[2], b"y");
    assert_eq!(f.d.dropped().stale_reports, 1, "too late to compare: stale");
}

#[test]
fn a_program_that_exits_with_a_status_fails_with_that_status_and_is_paid_for() {
    let mut f = fixture(1);
    let sent = assignments(&f.submit("exits", "receipt"))[0];
    let done = finals(&f.answer_with("exits", sent, b"", Exit::ExitStatus(3)));
    assert_eq!(done[0].status, EventStatus::Failed);
    assert_eq!(done[0].exit.as_deref(), Some("exit_status"));
    assert_eq!(done[0].exit_status, Some(3));
    assert_eq!(done[0].receipts[0].exit_status, Some(3));
    assert_eq!(done[0].error.as_ref().unwrap().code, "exit_status");
    assert!(
        f.journal
            .paid
            .borrow()
            .contains_key(&TaskId::new("exits").unwrap()),
        "the node did the work"
    );
}

#[test]
fn a_module_the_node_refused_before_running_costs_the_client_nothing() {
    let mut f = fixture(1);
    let sent = assignments(&f.submit("refused", "receipt"))[0];
    let done = finals(&f.answer_with("refused", sent, b"", Exit::Rejected));
    assert_eq!(done[0].status, EventStatus::Failed);
    assert_eq!(done[0].reward, Some(0));
    assert!(
        !f.journal
            .paid
            .borrow()
            .contains_key(&TaskId::new("refused").unwrap())
    );
}

#[test]
fn a_module_that_cannot_run_the_call_is_rejected_at_intake_and_never_journaled() {
    let mut f = fixture(1);
    let cases = [
        (
            B64.encode(MODULE),
            "classify",
            "module does not export a function `classify`",
        ),
        (B64.encode(b"(module)"), "run", "compile it first (wat2wasm"),
        (B64.encode(b"hello"), "run", "not WebAssembly"),
    ];
    for (i, (module, entry, why)) in cases.into_iter().enumerate() {
        let id = format!("bad-{i}");
        let fx =
            f.submit_json(serde_json::json!({"task_id": id, "module_b64": module, "entry": entry}));
        let ev: Vec<_> = events(&fx);
        assert!(
            ev.iter().all(|(_, e)| e.status == EventStatus::Rejected),
            "{ev:?}"
        );
        let error = ev[0].1.error.as_ref().unwrap();
        assert_eq!(error.code, "bad_module");
        assert!(error.message.contains(why), "{}", error.message);
        assert!(
            fx.journal.is_empty() && fx.dispatch.is_empty(),
            "nothing kept, nothing run"
        );
    }
}

#[test]
fn an_uploaded_module_that_cannot_run_is_not_stored_and_a_task_naming_it_hears_why() {
    let mut f = fixture(1);
    let bytes = b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0\x02\x0d\x01\x03env\x05abort\0\0";
    let hash = sha3_256(bytes);
    let fx = f.step(Input::Module { hash, bytes });
    assert!(fx.journal.is_empty());
    assert_eq!(f.d.dropped().bad_modules, 1);
    let fx =
        f.submit_json(serde_json::json!({"task_id": "uses-it", "module": hash.to_hex().as_str()}));
    let ev = events(&fx);
    let error = ev[0].1.error.as_ref().unwrap();
    assert_eq!(error.code, "bad_module");
    assert!(error.message.contains("env.abort"), "{}", error.message);
}

#[test]
fn an_unlisted_node_waits_for_approval_and_joins_with_its_stored_announce() {
    let listed = Identity::from_secret(&[1; 32]);
    let registry = Registry::new(RegistryConfig {
        enrollment: Enrollment::Allowlist(HashSet::from([listed.public_key()])),
        ..RegistryConfig::default()
    });
    let mut f = fixture_in(registry, 2, config());
    assert_eq!(f.d.registry().len(), 1);
    let pending = f.journal.pending.borrow().clone();
    let stranger = f.nodes[1].public_key();
    assert_eq!(pending.len(), 1, "the unlisted key waits for a verdict");
    assert_eq!(pending[0].0, stranger);

    f.step(Input::Verdict {
        public_key: stranger,
        admit: true,
        announce: Some(&pending[0].1),
    });
    assert_eq!(f.d.registry().len(), 2, "admitted with its stored announce");
    assert!(
        f.d.registry()
            .view(f.now.at, &NodeId::from_public_key(&stranger))
            .is_some()
    );
}

#[test]
fn a_revoked_node_leaves_at_once_and_its_task_completes_elsewhere() {
    let mut f = fixture(2);
    let first = assignments(&f.submit("t-rev", "receipt"))[0];
    let key = f.identity(first.0).public_key();
    let fx = f.step(Input::Verdict {
        public_key: key,
        admit: false,
        announce: None,
    });
    let next = assignments(&fx);
    assert_eq!(next.len(), 1, "the task moves at once");
    assert_ne!(next[0].0, first.0);
    assert_eq!(f.d.registry().len(), 1);

    assert!(
        finals(&f.answer("t-rev", first, b"out")).is_empty(),
        "the revoked node's answer counts for nothing"
    );
    let done = finals(&f.answer("t-rev", next[0], b"out"));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, EventStatus::Completed);
    assert_eq!(
        f.journal.paid.borrow()[&TaskId::new("t-rev").unwrap()],
        [(next[0].0, 1_000)],
        "only the node that ran it is paid"
    );
}

#[test]
fn a_node_that_goes_offline_and_stays_silent_hands_its_tasks_to_another() {
    let mut f = fixture(2);
    let first = assignments(&f.submit("t5", "receipt"))[0];
    let fx = f.frame(first.0, NodeTopic::Status, b"offline");
    assert!(
        assignments(&fx).is_empty(),
        "an unsigned presence cancels nothing"
    );
    assert!(assignments(&f.advance(Duration::from_secs(9))).is_empty());
    let next = assignments(&f.advance(Duration::from_secs(1)));
    assert_eq!(
        next.len(),
        1,
        "silent for the offline grace: the task moves"
    );
    assert_ne!(next[0].0, first.0);
}

#[test]
fn a_spot_check_whose_original_run_is_lost_completes_on_the_checks_receipt_alone() {
    let mut f = fixture_with(
        2,
        DispatchConfig {
            spot_check_permille: 1000,
            ..config()
        },
    );
    let sent = assignments(&f.submit("spot", "receipt"));
    assert_eq!(sent.len(), 2, "the run and its spot check");
    assert!(finals(&f.answer("spot", sent[1], b"out")).is_empty());
    // The other node dies mid-run; nothing else could take the check.
    f.frame(sent[0].0, NodeTopic::Status, b"offline");
    let done = finals(&f.advance(Duration::from_secs(10)));
    assert_eq!(
        done.len(),
        1,
        "not left waiting for a node that never comes"
    );
    assert_eq!(done[0].status, EventStatus::Completed);
    assert_eq!(done[0].nodes, vec![sent[1].0.to_hex().to_string()]);
    let verdict = done[0].verdict.as_ref().unwrap();
    assert!(verdict.spot_checked);
    assert!(
        verdict.spot_check_missed.is_some(),
        "the event says the check was missed"
    );
}

/// Two nodes of 4 slots, every receipt task spot-checked: four tasks fill both nodes, and
/// node 0 finishes its four, so it is free while node 1 is still full.
fn second_node_busy() -> (Fixture, Vec<(NodeId, u16)>) {
    let mut f = fixture_with(
        2,
        DispatchConfig {
            spot_check_permille: 1000,
            ..config()
        },
    );
    let mut on_second = Vec::new();
    for i in 0..4 {
        let id = format!("fill{i}");
        let sent = assignments(&f.submit(&id, "receipt"));
        assert_eq!(sent.len(), 2, "a run and its check");
        let (first, second) = if sent[0].0 == f.nodes[0].node_id() {
            (sent[0], sent[1])
        } else {
            (sent[1], sent[0])
        };
        assert!(finals(&f.answer(&id, first, b"out")).is_empty());
        on_second.push(second);
    }
    (f, on_second)
}

#[test]
fn a_queued_check_is_placed_before_a_new_task_that_queued_earlier() {
    let mut f = fixture_with(
        1,
        DispatchConfig {
            spot_check_permille: 1000,
            ..config()
        },
    );
    f.join(Identity::from_secret(&[2; 32]), "riscv64");
    let (a, b) = (f.nodes[0].node_id(), f.nodes[1].node_id());
    // Node b's four slots taken by checks of runs node a has answered.
    let mut on_b = Vec::new();
    for i in 0..4 {
        let id = format!("fill{i}");
        let sent = assignments(&f.submit(&id, "receipt"));
        let run = |node| sent.iter().copied().find(|s| s.0 == node).unwrap();
        f.answer(&id, run(a), b"out");
        on_b.push((id, run(b)));
    }
    let fresh = f.submit_json(serde_json::json!({
        "task_id": "fresh", "module_b64": B64.encode(MODULE), "input": "in",
        "requires": {"arch": "riscv64"},
    }));
    assert!(
        assignments(&fresh).is_empty(),
        "only node b can run it, and b is full"
    );
    let late = assignments(&f.submit("late", "receipt"));
    assert_eq!(late, vec![(a, 1)], "its check waits for node b");
    let (id, sent) = &on_b[0];
    let next = assignments(&f.answer(id, *sent, b"out"));
    assert_eq!(
        next,
        vec![(b, 2)],
        "node b's free slot goes to the check, queued last: work started finishes first"
    );
}

#[test]
fn a_spot_check_waits_for_a_distinct_busy_node_instead_of_being_dropped() {
    let (mut f, on_second) = second_node_busy();
    let sent = assignments(&f.submit("late", "receipt"));
    assert_eq!(sent, vec![(f.nodes[0].node_id(), 1)], "only node 0 is free");
    let fx = f.answer("late", sent[0], b"late-out");
    assert!(
        finals(&fx).is_empty(),
        "the verified run waits for its check rather than ending unchecked"
    );
    // Node 1 finishes one task: its free slot goes to the waiting check.
    let fx = f.answer("fill0", on_second[0], b"out");
    let check = assignments(&fx);
    assert_eq!(check, vec![(f.nodes[1].node_id(), 2)]);
    let done = finals(&f.answer("late", check[0], b"late-out"));
    assert_eq!(done.len(), 1);
    let verdict = done[0].verdict.as_ref().unwrap();
    assert_eq!(verdict.agreeing, 2, "checked on two distinct nodes");
    assert_eq!(verdict.spot_check_missed, None);
}

#[test]
fn a_spot_check_that_finds_no_free_node_within_the_queue_timeout_ends_on_its_receipt_and_says_so() {
    let (mut f, _) = second_node_busy();
    let sent = assignments(&f.submit("late", "receipt"));
    assert!(finals(&f.answer("late", sent[0], b"late-out")).is_empty());
    let mut fx = f.advance(config().queue_timeout);
    let done = finals(&fx);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].task_id, "late");
    assert_eq!(done[0].status, EventStatus::Completed, "the receipt stands");
    let missed = done[0].verdict.as_ref().unwrap().spot_check_missed.clone();
    assert!(
        missed
            .as_deref()
            .is_some_and(|m| m.contains("no distinct node was free")),
        "{missed:?}"
    );
    let ended: Vec<Ended> = fx.outcomes.drain(..).collect();
    assert_eq!(
        ended.iter().map(|e| e.spot_check).collect::<Vec<_>>(),
        vec![Some(SpotCheck::Missed)],
        "counted as missed"
    );
}

#[test]
fn a_nodes_speed_is_observed_from_runs_another_node_agreed_with_never_from_a_receipt_alone() {
    let mut f = fixture(3);
    let observed = |f: &Fixture, node: NodeId| {
        f.d.registry
            .view(f.now.at, &node)
            .unwrap()
            .observed_fuel_per_s
    };
    // 5·10^7 fuel answered 100 ms after the assignment.
    let answer = |f: &mut Fixture, task: &str, sent: (NodeId, u16)| {
        let frame = f.report_claiming(task, sent, b"out", Exit::Ok, f.identity(sent.0), |r| {
            r.fuel_used = 50_000_000
        });
        f.frame(sent.0, NodeTopic::Results, &frame)
    };
    // Alone, a receipt could claim any fuel: its time says nothing of the node's speed.
    let sent = assignments(&f.submit("alone", "receipt"));
    assert_eq!(sent.len(), 1);
    f.advance(Duration::from_millis(100));
    assert_eq!(finals(&answer(&mut f, "alone", sent[0])).len(), 1);
    assert_eq!(observed(&f, sent[0].0), None);
    // Two nodes agreeing on the output and the fuel: each one's time counts.
    let sent = assignments(&f.submit("pair", "replicate:2"));
    assert_eq!(sent.len(), 2);
    f.advance(Duration::from_millis(100));
    answer(&mut f, "pair", sent[0]);
    assert_eq!(finals(&answer(&mut f, "pair", sent[1])).len(), 1);
    for (node, _) in sent {
        assert_eq!(observed(&f, node), Some(500_000_000));
    }
}

#[test]
fn a_spot_check_agreed_on_two_nodes_is_counted_as_agreed() {
    let mut f = fixture_with(
        2,
        DispatchConfig {
            spot_check_permille: 1000,
            ..config()
        },
    );
    let sent = assignments(&f.submit("both", "receipt"));
    assert!(finals(&f.answer("both", sent[0], b"out")).is_empty());
    let fx = f.answer("both", sent[1], b"out");
    assert_eq!(finals(&fx).len(), 1);
    assert_eq!(fx.outcomes.len(), 1);
    assert_eq!(fx.outcomes[0].spot_check, Some(SpotCheck::Agreed));
    assert_eq!(fx.outcomes[0].status, TaskStatus::Completed);
}

#[test]
fn a_spot_check_never_returns_to_a_node_that_timed_out_and_the_receipt_stands() {
    let mut f = fixture_with(
        2,
        DispatchConfig {
            spot_check_permille: 1000,
            ..config()
        },
    );
    let sent = assignments(&f.submit("check", "receipt"));
    assert_eq!(sent.len(), 2);
    assert!(finals(&f.answer("check", sent[1], b"out")).is_empty());
    // The other node never answers: its attempt times out.
    let wait =
        Duration::from_millis(ambient_core::Limits::default().timeout_ms) + Duration::from_secs(16);
    let fx = f.advance(wait);
    assert!(
        assignments(&fx).is_empty(),
        "the check is not sent back to the node that timed out"
    );
    let done = finals(&fx);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, EventStatus::Completed);
    assert_eq!(done[0].nodes, vec![sent[1].0.to_hex().to_string()]);
}

#[test]
fn a_spoofed_offline_is_disproved_by_the_nodes_telemetry_and_its_task_completes() {
    let mut f = fixture(2);
    let first = assignments(&f.submit("t5b", "receipt"))[0];
    f.frame(first.0, NodeTopic::Status, b"offline");
    let telemetry = Telemetry {
        node: first.0,
        seq: 2,
        boot_id: 1,
        sample: TelemetrySample::default(),
    };
    let signature = sign_message(f.identity(first.0), SignedTelemetry::TAG, &telemetry).unwrap();
    let frame = Envelope::new(Message::Telemetry(SignedTelemetry {
        telemetry,
        signature,
    }))
    .to_vec();
    f.frame(first.0, NodeTopic::Telemetry, &frame);
    assert!(assignments(&f.advance(Duration::from_secs(20))).is_empty());
    let view = f.d.registry().view(f.now.at, &first.0).unwrap();
    assert_eq!(view.reputation.failed, 0);
    let done = finals(&f.answer("t5b", first, b"out"));
    assert_eq!(done[0].status, EventStatus::Completed);
}

#[test]
fn a_task_no_node_can_take_fails_after_the_queue_timeout_naming_the_requirement() {
    let mut f = fixture(2);
    let fx = f.submit_json(serde_json::json!({"task_id": "sparc", "module_b64": B64.encode(MODULE), "requires": {"arch": "sparc"}}));
    assert_eq!(
        events(&fx)[0].1.status,
        EventStatus::Accepted,
        "nodes may still join"
    );
    assert!(assignments(&fx).is_empty());
    // Node traffic re-tries the queue; it must not restart the clock.
    for _ in 0..9 {
        assert!(finals(&f.advance(Duration::from_secs(1))).is_empty());
        f.frame(f.nodes[0].node_id(), NodeTopic::Status, b"online");
    }
    let done = finals(&f.advance(Duration::from_secs(1)));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, EventStatus::Failed);
    let message = error_message(&done[0]);
    assert!(
        message.contains("no registered node has arch \"sparc\""),
        "{message}"
    );
    assert!(
        message.contains("aarch64"),
        "names what is registered: {message}"
    );
}

#[test]
fn replicas_above_the_node_count_fail_naming_the_count() {
    let mut f = fixture(3);
    let sent = assignments(&f.submit("seven", "replicate:7"));
    assert_eq!(sent.len(), 3);
    for s in sent {
        assert!(finals(&f.answer("seven", s, b"same")).is_empty());
    }
    let done = finals(&f.advance(Duration::from_secs(11)));
    assert_eq!(done.len(), 1);
    let message = error_message(&done[0]);
    assert!(
        message.contains("needs 7 distinct nodes and 3"),
        "{message}"
    );
    assert!(
        f.journal.paid.borrow().is_empty(),
        "no majority of 7, nothing paid"
    );
}

#[test]
fn a_task_queued_behind_one_no_node_can_take_is_still_placed() {
    let mut f = fixture(1);
    f.submit_json(serde_json::json!({"task_id": "sparc", "module_b64": B64.encode(MODULE), "requires": {"arch": "sparc"}}));
    let sent = assignments(&f.submit("after", "receipt"));
    assert_eq!(sent.len(), 1);
}

#[test]
fn the_same_task_id_with_the_same_content_is_answered_with_where_it_stands() {
    let mut f = fixture(1);
    let sent = assignments(&f.submit("dup", "receipt"))[0];
    let again = f.submit("dup", "receipt");
    assert!(assignments(&again).is_empty(), "not run twice");
    assert!(again.journal.is_empty());
    assert_eq!(events(&again)[0].1.status, EventStatus::Accepted);
    let done = finals(&f.answer("dup", sent, b"out"));
    let after = f.submit("dup", "receipt");
    assert_eq!(
        finals(&after),
        done,
        "a finished task answers with its stored result"
    );
}

#[test]
fn a_resubmission_in_the_same_turn_as_its_result_gets_that_result() {
    let mut f = fixture(1);
    let sent = assignments(&f.submit("same-turn", "receipt"))[0];
    let report = f.report("same-turn", sent, b"out", Exit::Ok, f.identity(sent.0));
    let json = serde_json::json!({"task_id": "same-turn", "module_b64": B64.encode(MODULE), "input": "in", "verify": "receipt"}).to_string();
    let mut fx = Effects::default();
    f.d.handle(
        f.now,
        Input::Frame(Frame {
            node: sent.0,
            leaf: NodeTopic::Results,
            frame: &report,
            received: f.now.at,
            signed_by: None,
        }),
        &f.journal,
        &mut fx,
    );
    f.d.handle(f.now, Input::Submit(json.as_bytes()), &f.journal, &mut fx);
    let done = finals(&fx);
    assert_eq!(done.len(), 2);
    assert_eq!(done[0], done[1]);
}

#[test]
fn the_same_task_id_with_other_content_is_rejected_as_a_conflict() {
    let mut f = fixture(1);
    let sent = assignments(&f.submit("c", "receipt"))[0];
    let check = |fx: &Effects| {
        let evs = events(fx);
        assert!(
            evs.iter().any(|(t, e)| t.ends_with("/c/result")
                && e.status == EventStatus::Rejected
                && e.error.as_ref().unwrap().code == "conflict"),
            "{evs:?}"
        );
        assert!(fx.journal.is_empty() && assignments(fx).is_empty());
    };
    check(&f.submit("c", "replicate:2"));
    f.answer("c", sent, b"out");
    check(&f.submit("c", "replicate:2"));
}

#[test]
fn a_task_journaled_before_the_default_policy_was_configurable_is_found_by_its_resubmission() {
    let mut f = fixture(1);
    let json =
        serde_json::json!({"task_id": "old", "module_b64": B64.encode(MODULE), "input": "in"});
    let sent = assignments(&f.submit_json(json.clone()))[0];
    f.answer("old", sent, b"out");
    // What an older coordinator journaled for a submission with no `verify`.
    for known in f.journal.tasks.borrow_mut().values_mut() {
        assert!(
            known.spec_json.contains(r#""policy":null"#),
            "{}",
            known.spec_json
        );
        known.spec_json = known
            .spec_json
            .replace(r#""policy":null"#, r#""policy":"Receipt""#);
    }
    let evs = events(&f.submit_json(json));
    let statuses: Vec<EventStatus> = evs.iter().map(|(_, e)| e.status).collect();
    assert_eq!(
        statuses,
        [EventStatus::Accepted, EventStatus::Completed],
        "the stored result, not a conflict"
    );
    // A different policy is still different content.
    let other = serde_json::json!({"task_id": "old", "module_b64": B64.encode(MODULE), "input": "in", "verify": "target:1e-4"});
    let evs = events(&f.submit_json(other));
    assert_eq!(evs[0].1.status, EventStatus::Rejected, "{evs:?}");
}

#[test]
fn malformed_json_is_rejected_on_the_rejected_topic_with_the_id_it_could_read() {
    let mut f = fixture(1);
    let fx = f.step(Input::Submit(br#"{"task_id": "half", "module": "#));
    let evs = events(&fx);
    assert_eq!(evs.len(), 2, "{evs:?}");
    assert_eq!(evs[0].0, "ambient/v1/tasks/half/result");
    assert_eq!(evs[1].0, topics::REJECTED);
    assert_eq!(evs[1].1.task_id, "half");
    assert_eq!(evs[1].1.error.as_ref().unwrap().code, "bad_json");
    let fx = f.step(Input::Submit(b"\xff not json at all"));
    let evs = events(&fx);
    assert_eq!(evs.len(), 1);
    assert_eq!(
        (evs[0].0.as_str(), evs[0].1.task_id.as_str()),
        (topics::REJECTED, "")
    );
}

#[test]
fn a_json_array_of_submissions_is_taken_as_each_sent_alone_and_a_bad_array_is_rejected_whole() {
    let mut f = fixture(2);
    let ok = |id: &str| serde_json::json!({"task_id": id, "module_b64": B64.encode(MODULE), "input": "in", "verify": "receipt"});
    let batch = serde_json::json!([ok("b1"), {"task_id": "b2", "colour": 1}, ok("b3")]);
    let fx = f.step(Input::Submit(batch.to_string().as_bytes()));
    let statuses: Vec<(String, EventStatus)> = events(&fx)
        .into_iter()
        .filter(|(topic, _)| topic != topics::REJECTED)
        .map(|(_, ev)| (ev.task_id, ev.status))
        .collect();
    assert_eq!(
        statuses,
        [
            ("b1".into(), EventStatus::Accepted),
            ("b2".into(), EventStatus::Rejected),
            ("b3".into(), EventStatus::Accepted)
        ]
    );
    assert_eq!(assignments(&fx).len(), 2);
    // One over the limit, or not JSON: nothing in it is taken, and the rejection says why.
    let many: Vec<_> = (0..=crate::intake::MAX_SUBMISSIONS_PER_MESSAGE)
        .map(|i| ok(&format!("m{i}")))
        .collect();
    for bad in [
        serde_json::json!(many).to_string(),
        format!("[{},", ok("torn")),
    ] {
        let fx = f.step(Input::Submit(bad.as_bytes()));
        let evs = events(&fx);
        assert_eq!(evs.len(), 1, "{evs:?}");
        assert_eq!(evs[0].0, topics::REJECTED);
        assert_eq!(evs[0].1.error.as_ref().unwrap().code, "bad_json");
        assert!(fx.journal.is_empty() && assignments(&fx).is_empty());
    }
}

#[test]
fn a_reconnect_sends_every_outstanding_assignment_and_module_again() {
    let mut f = fixture(2);
    let mut sent = assignments(&f.submit("r1", "receipt"));
    sent.extend(assignments(&f.submit("r2", "replicate:2")));
    let fx = f.step(Input::Connected);
    let mut again = assignments(&fx);
    sent.sort();
    again.sort();
    assert_eq!(again, sent);
    assert_eq!(fx.modules, vec![sha3_256(MODULE)]);
    assert!(fx.journal.is_empty(), "nothing new to journal");
}

#[test]
fn a_busy_refusal_is_not_a_failure_and_the_node_rests_until_it_reports_again() {
    let mut f = fixture(1);
    let sent = assignments(&f.submit("busy", "receipt"))[0];
    let refusal = f.refusal("busy", sent, Refusal::Busy);
    for _ in 0..5 {
        let fx = f.frame(sent.0, NodeTopic::Results, &refusal);
        assert!(finals(&fx).is_empty(), "busy refusals do not fail the task");
        assert!(assignments(&fx).is_empty(), "the busy node rests");
    }
    // Its next sample makes it available again, and the task goes out.
    let telemetry = Telemetry {
        node: sent.0,
        seq: 2,
        boot_id: 1,
        sample: TelemetrySample {
            latency_us: Some(1_000),
            mem_free_bytes: Some(4 << 30),
            ..TelemetrySample::default()
        },
    };
    let signature = sign_message(&f.nodes[0], SignedTelemetry::TAG, &telemetry).unwrap();
    let frame = Envelope::new(Message::Telemetry(SignedTelemetry {
        telemetry,
        signature,
    }))
    .to_vec();
    let fx = f.frame(sent.0, NodeTopic::Telemetry, &frame);
    assert_eq!(
        assignments(&fx),
        vec![(sent.0, sent.1 + 1)],
        "placed once the node reported"
    );
}

#[test]
fn a_node_coming_back_online_gets_its_outstanding_assignments_again() {
    let mut f = fixture(2);
    let sent = assignments(&f.submit("back", "receipt"))[0];
    let fx = f.frame(sent.0, NodeTopic::Status, b"online");
    assert_eq!(assignments(&fx), vec![sent]);
    let other = f
        .nodes
        .iter()
        .map(Identity::node_id)
        .find(|n| *n != sent.0)
        .unwrap();
    assert!(assignments(&f.frame(other, NodeTopic::Status, b"online")).is_empty());
}

#[test]
fn recovered_dispatches_are_sent_again_under_their_attempt_numbers_and_their_reports_count() {
    let mut f = fixture(1);
    let sent = assignments(&f.submit("crash", "receipt"))[0];
    // The coordinator dies here: the journal has the task and its dispatch.
    let mut d = Dispatcher::recover(
        config(),
        registry(),
        coordinator(),
        f.journal.recovered(),
        f.now,
        1,
    );
    std::mem::swap(&mut f.d, &mut d);
    let ids = std::mem::take(&mut f.nodes);
    for id in ids {
        f.join(id, "aarch64");
    }
    assert_eq!(f.d.unfinished(), 1);
    let fx = f.step(Input::Connected);
    assert_eq!(assignments(&fx), vec![sent], "same node, same attempt");
    let done = finals(&f.answer("crash", sent, b"out"));
    assert_eq!(
        done.len(),
        1,
        "the report of the adopted attempt is not stale"
    );
    assert_eq!(done[0].status, EventStatus::Completed);
    assert_eq!(f.journal.paid.borrow().len(), 1);
}

#[test]
fn final_events_finished_just_before_a_crash_are_published_again_once() {
    let now = Now {
        at: Instant::now(),
        unix_ms: 1,
    };
    let id = TaskId::new("done").unwrap();
    let recovered = Recovered {
        finished: vec![(
            id.clone(),
            "{\"task_id\":\"done\",\"status\":\"completed\"}".into(),
        )],
        ..Recovered::default()
    };
    let mut d = Dispatcher::recover(config(), registry(), coordinator(), recovered, now, 1);
    let mut fx = Effects::default();
    d.handle(now, Input::Connected, &Mem::default(), &mut fx);
    assert_eq!(fx.events.len(), 1);
    assert_eq!(fx.events[0].topic, topics::task_result(&id).as_str());
    fx.clear();
    d.handle(now, Input::Connected, &Mem::default(), &mut fx);
    assert!(fx.events.is_empty(), "only after the restart");
}

#[test]
fn a_ping_is_answered_with_its_nonce_signed_only_on_its_own_node_topic() {
    let node = Identity::from_secret(&[1; 32]).node_id();
    let other = Identity::from_secret(&[2; 32]).node_id();
    let frame = Envelope::new(Message::Ping(Ping {
        node,
        nonce: 42,
        padding: &[0; 8],
    }))
    .to_vec();
    let me = coordinator();
    let p = pong(&me, node, NodeTopic::Telemetry, &frame).unwrap();
    assert_eq!(p.topic, topics::node(&node, NodeTopic::Tasks).as_str());
    let Message::Pong(answer) = Envelope::decode(&p.payload).unwrap().message else {
        panic!("not a pong");
    };
    assert_eq!(answer.nonce, 42);
    assert_eq!(answer.signer, me.public_key());
    assert_eq!(answer.verify(&node), Ok(()));
    assert_eq!(pong(&me, other, NodeTopic::Telemetry, &frame), None);
    assert_eq!(pong(&me, node, NodeTopic::Results, &frame), None);
}

#[test]
fn a_probes_round_trip_ends_when_its_pong_was_read_not_when_the_dispatcher_got_to_it() {
    let mut f = fixture(1);
    let node = f.nodes[0].node_id();
    let latency = |f: &Fixture| {
        f.d.registry()
            .view(f.now.at, &node)
            .unwrap()
            .observed_latency_us
    };
    assert_eq!(latency(&f), Some(1_000), "the fixture's first probe");
    // The next probe is due one interval later; it leaves at QoS 0.
    f.now.at += RegistryConfig::default().probe_interval;
    let fx = f.step(Input::Probes);
    let probes: Vec<_> = fx
        .dispatch
        .iter()
        .filter(|p| !p.reliable && p.topic == topics::node(&node, NodeTopic::Tasks).as_str())
        .collect();
    assert_eq!(probes.len(), 1);
    let Message::Probe(probe) = Envelope::decode(&probes[0].payload).unwrap().message else {
        panic!("not a probe");
    };
    // Read 1 ms after it left, handled 50 ms later behind a backlog: 1 ms.
    let pong = Envelope::new(Message::Pong(Pong::sign(&f.nodes[0], &node, probe.nonce))).to_vec();
    let received = f.now.at + Duration::from_millis(1);
    f.now.at += Duration::from_millis(50);
    f.step(Input::Frame(Frame {
        node,
        leaf: NodeTopic::Telemetry,
        frame: &pong,
        received,
        signed_by: None,
    }));
    assert_eq!(latency(&f), Some(1_000));
    // The same pong again answers nothing.
    f.frame(node, NodeTopic::Telemetry, &pong);
    assert_eq!(f.d.dropped().stale_pongs, 1);
}
