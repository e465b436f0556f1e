//! The node driven by hand: inputs in, the actions it decides, as one line each.

use ambient_core::{Assignment, Pong, TripReason};

use super::*;

/// A compiled module, as far as the node cares.
type Module = &'static str;

const SECOND: Duration = Duration::from_secs(1);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const GRACE: Duration = Duration::from_secs(30);

fn coordinator() -> Identity {
    Identity::from_secret(&[0xC0; 32])
}

fn settings(max_concurrency: u16) -> Settings {
    Settings {
        max_concurrency,
        dedup_capacity: 64,
        safety: SafetyPolicy::default(),
        module_fetch_timeout: FETCH_TIMEOUT,
        shutdown_grace: GRACE,
        bandwidth_probe_every: 3,
        link_offset: None,
        simulated: false,
        key_file: "/state/coordinator.pub".into(),
        #[cfg(feature = "fault-injection")]
        faults: crate::fault::Faults::default(),
    }
}

/// A node driven by hand: `at(t)` is `t` after its start.
struct Harness {
    node: Node<Module>,
    id: NodeId,
    t0: Instant,
}

impl Harness {
    fn new(max_concurrency: u16, pinned: Option<[u8; 32]>, stored: Stored) -> Self {
        let identity = Arc::new(Identity::from_secret(&[7; 32]));
        let id = identity.node_id();
        let t0 = Instant::now();
        let start = Start {
            identity,
            announce: Bytes::from_static(b"announce"),
            stored,
            coordinator_key: pinned,
            boot_id: 1,
            first_nonce: 100,
        };
        let node = Node::new(settings(max_concurrency), start, t0);
        Self { node, id, t0 }
    }

    /// Pinned to [`coordinator`], connected, nothing stored.
    fn online(max_concurrency: u16) -> Self {
        let mut h = Self::new(max_concurrency, Some(coordinator().public_key()), vec![]);
        h.step(Duration::ZERO, Input::Connected);
        h
    }

    fn step(&mut self, at: Duration, input: Input<Module>) -> Vec<Action<Module>> {
        let mut out = Vec::new();
        self.node.handle(self.t0 + at, input, &mut out);
        out
    }

    /// [`Harness::step`], each action in a line of [`describe`].
    fn said(&mut self, at: Duration, input: Input<Module>) -> Vec<String> {
        self.step(at, input).iter().map(describe).collect()
    }

    fn assign(&self, task: &str, attempt: u16, module: u8) -> Input<Module> {
        Input::Tasks(assignment(&self.id, task, attempt, module, &coordinator()))
    }
}

/// Input of every assignment in these tests.
const INPUT: &[u8] = b"input";

/// Attempt `attempt` of `task` with module `[module; 32]`, not signed yet.
fn unsigned(task: &str, attempt: u16, module: u8) -> Assignment<'static> {
    Assignment {
        task_id: TaskId::new(task).unwrap(),
        attempt,
        module: Digest([module; 32]),
        abi: Abi::Plain,
        entry: "run".try_into().unwrap(),
        limits: Limits::default(),
        input: INPUT,
        coordinator: [0; 32],
        batch: heapless::Vec::new(),
        signature: [0; 64],
    }
}

fn assignment(node: &NodeId, task: &str, attempt: u16, module: u8, by: &Identity) -> Bytes {
    let mut a = unsigned(task, attempt, module);
    a.sign(by, node, &sha3_256(INPUT));
    Envelope::new(Message::Assign(a)).to_vec().into()
}

fn finished(task: &str, attempt: u16, admitted: bool) -> Input<Module> {
    Input::Finished(Finished {
        key: (TaskId::new(task).unwrap(), attempt),
        admitted,
        outcome: Some(true),
        payload: Bytes::from(format!("report of {task}/{attempt}")),
        exit: Some(Exit::Ok),
        fuel_used: 1,
        elapsed: Duration::ZERO,
    })
}

fn module(n: u8) -> Digest {
    Digest([n; 32])
}

/// One line per action, enough to tell them apart in an assertion.
fn describe(action: &Action<Module>) -> String {
    let key = |k: &TaskKey| format!("{}/{}", k.0, k.1);
    let m = |h: &Digest| h.0[0];
    match action {
        Action::Publish {
            leaf,
            payload,
            report,
            ..
        } => match (leaf, report) {
            (Leaf::Results, Some(seq)) => format!("publish report #{seq}"),
            (Leaf::Results, None) => {
                format!("resend {}", String::from_utf8_lossy(payload))
            }
            (Leaf::Status, _) => format!("status {}", String::from_utf8_lossy(payload)),
            (Leaf::Telemetry, _) => match Envelope::decode(payload).unwrap().message {
                Message::Telemetry(_) => "telemetry".into(),
                Message::Ping(p) if p.padding.is_empty() => format!("ping {}", p.nonce),
                Message::Ping(p) => format!("large ping {}", p.nonce),
                Message::Pong(p) => format!("pong {}", p.nonce),
                other => panic!("{other:?} on telemetry"),
            },
            (leaf, _) => format!("publish {leaf:?}"),
        },
        Action::SubscribeTasks => "subscribe tasks".into(),
        Action::Subscribe(h) => format!("subscribe module {}", m(h)),
        Action::Unsubscribe(h) => format!("unsubscribe module {}", m(h)),
        Action::Start(job) => format!("start {}", key(&job.key())),
        Action::Load(h) => format!("load module {}", m(h)),
        Action::Prepare { hash, .. } => format!("compile module {}", m(hash)),
        Action::Execute { job, module } => format!("execute {} on {module}", key(&job.key())),
        Action::Reject { job, .. } => format!("reject {}", key(&job.key())),
        Action::Refuse {
            key: k,
            refusal,
            admitted,
        } => format!("refuse {} {refusal:?} admitted={admitted}", key(k)),
        Action::Sample { running } => format!("sample running={running}"),
        Action::Sampled(s) => format!("sampled {:?}", s.breaker),
        Action::Outbox(Op::Write(seq, _)) => format!("write #{seq}"),
        Action::Outbox(Op::Remove(seq)) => format!("remove #{seq}"),
        Action::PinKey { .. } => "pin key".into(),
        Action::Disconnect => "disconnect".into(),
        Action::Finish => "finish".into(),
    }
}

fn reading(temp_c: i32) -> Input<Module> {
    Input::Reading(Reading {
        temp_millic: Some(temp_c * 1000),
        ..Reading::default()
    })
}

#[test]
fn connecting_subscribes_says_online_announces_and_asks_for_a_sample() {
    let mut h = Harness::new(1, None, vec![]);
    assert_eq!(
        h.said(Duration::ZERO, Input::Connected),
        [
            "subscribe tasks",
            "status online",
            "publish Announce",
            "sample running=0"
        ]
    );
}

#[test]
fn the_first_coordinator_to_sign_an_assignment_is_pinned_and_no_other_is_obeyed() {
    let mut h = Harness::new(4, None, vec![]);
    h.step(Duration::ZERO, Input::Connected);
    let first = h.assign("t1", 1, 1);
    assert_eq!(h.said(SECOND, first), ["pin key", "start t1/1"]);
    let stranger = Identity::from_secret(&[0xEE; 32]);
    let forged = Input::Tasks(assignment(&h.id, "t2", 1, 1, &stranger));
    assert!(h.said(SECOND, forged).is_empty());
    assert_eq!(h.node.dropped_frames, 1);
}

/// Assignments `tasks` (attempt 1) to `node`, under one signature by `by`.
fn batch(node: &NodeId, tasks: &[&str], by: &Identity) -> Vec<Assignment<'static>> {
    let mut sent: Vec<_> = tasks.iter().map(|task| unsigned(task, 1, 1)).collect();
    let claims: heapless::Vec<Digest, { ambient_core::MAX_BATCH }> = sent
        .iter()
        .map(|a| a.claim_digest(node, &sha3_256(INPUT)).unwrap())
        .collect();
    for a in &mut sent {
        a.seal(by, &claims);
    }
    sent
}

fn frame(a: Assignment<'_>) -> Input<Module> {
    Input::Tasks(Envelope::new(Message::Assign(a)).to_vec().into())
}

#[test]
fn assignments_under_one_batch_signature_run_and_nothing_the_batch_does_not_list_does() {
    let mut h = Harness::online(4);
    let mut sent = batch(&h.id, &["t1", "t2"], &coordinator());
    let (t1, t2) = (sent.remove(0), sent.remove(0));
    let mut unlisted = t1.clone();
    unlisted.attempt = 2;
    // The batch's signature, over a list naming a task it never signed.
    let mut relisted = batch(&h.id, &["t3"], &coordinator()).remove(0);
    relisted.signature = t1.signature;
    assert_eq!(h.said(SECOND, frame(t1)), ["start t1/1"]);
    assert_eq!(h.said(SECOND, frame(t2)), ["start t2/1"]);
    assert!(h.said(SECOND, frame(unlisted)).is_empty());
    assert!(h.said(SECOND, frame(relisted)).is_empty());
    assert_eq!(h.node.dropped_frames, 2);
}

#[test]
fn garbage_and_assignments_for_another_node_are_dropped_without_a_report() {
    let mut h = Harness::online(4);
    let other = Identity::from_secret(&[9; 32]).node_id();
    let misrouted = Input::Tasks(assignment(&other, "t1", 1, 1, &coordinator()));
    assert!(h.said(SECOND, misrouted).is_empty());
    let garbage = Input::Tasks(Bytes::from_static(b"\xff\x00not a frame"));
    assert!(h.said(SECOND, garbage).is_empty());
    assert_eq!(h.node.dropped_frames, 2);
}

#[test]
fn an_assignment_beyond_the_slots_is_refused_as_busy_until_a_report_frees_one() {
    let mut h = Harness::online(1);
    let (a, b, c) = (
        h.assign("a", 1, 1),
        h.assign("b", 1, 1),
        h.assign("c", 1, 1),
    );
    assert_eq!(h.said(SECOND, a), ["start a/1"]);
    assert_eq!(h.said(SECOND, b), ["refuse b/1 Busy admitted=false"]);
    assert_eq!(
        h.said(SECOND, finished("a", 1, true)),
        ["publish report #0"]
    );
    assert_eq!(h.said(SECOND, c), ["start c/1"]);
}

#[test]
fn a_duplicate_assignment_is_answered_from_the_filter_and_never_run_twice() {
    let mut h = Harness::online(4);
    let again = || h.assign("a", 1, 1);
    let (first, second, third) = (again(), again(), again());
    assert_eq!(h.said(SECOND, first), ["start a/1"]);
    // Still running: nothing to send, nothing to run.
    assert!(h.said(SECOND, second).is_empty());
    assert_eq!(
        h.said(SECOND, finished("a", 1, true)),
        ["publish report #0"]
    );
    assert!(h.said(SECOND, Input::Delivered(0)).is_empty());
    // Delivered, yet the coordinator asks again: it lost the report, so send it again.
    assert_eq!(h.said(SECOND, third), ["resend report of a/1"]);
    // A new attempt of the same task is new work.
    let retry = h.assign("a", 2, 1);
    assert_eq!(h.said(SECOND, retry), ["start a/2"]);
}

#[test]
fn a_module_not_in_memory_is_loaded_then_fetched_and_refused_when_it_never_arrives() {
    let mut h = Harness::online(4);
    let (a, b) = (h.assign("a", 1, 5), h.assign("b", 1, 5));
    let job = |actions: Vec<Action<Module>>| match actions.into_iter().next() {
        Some(Action::Start(job)) => job,
        other => panic!("expected a start, got {other:?}"),
    };
    let (ja, jb) = (job(h.step(SECOND, a)), job(h.step(SECOND, b)));
    assert_eq!(h.said(SECOND, Input::NotCached(ja)), ["load module 5"]);
    // One lookup per module, however many jobs wait for it.
    assert!(h.said(SECOND, Input::NotCached(jb)).is_empty());
    let absent = Input::Loaded {
        hash: module(5),
        result: Ok(None),
    };
    assert_eq!(h.said(2 * SECOND, absent), ["subscribe module 5"]);
    assert_eq!(
        h.node.next_deadline(),
        Some(h.t0 + 2 * SECOND + FETCH_TIMEOUT)
    );
    assert!(
        h.said(2 * SECOND + FETCH_TIMEOUT / 2, Input::Timer)
            .is_empty()
    );
    assert_eq!(
        h.said(2 * SECOND + FETCH_TIMEOUT, Input::Timer),
        [
            "unsubscribe module 5",
            "refuse a/1 ModuleUnavailable admitted=true",
            "refuse b/1 ModuleUnavailable admitted=true"
        ]
    );
    assert_eq!(h.node.next_deadline(), None);
}

#[test]
fn fetched_bytes_are_compiled_once_and_every_waiting_job_runs_on_them() {
    let mut h = Harness::online(4);
    for task in ["a", "b"] {
        let Some(Action::Start(job)) = h.step(SECOND, h.assign(task, 1, 5)).pop() else {
            panic!("not started");
        };
        h.step(SECOND, Input::NotCached(job));
    }
    let absent = Input::Loaded {
        hash: module(5),
        result: Ok(None),
    };
    h.step(SECOND, absent);
    let bytes = Input::Module {
        hash: module(5),
        payload: Bytes::from_static(b"\0asm"),
    };
    assert_eq!(
        h.said(SECOND, bytes),
        ["unsubscribe module 5", "compile module 5"]
    );
    // A second copy while compiling is ignored.
    let copy = Input::Module {
        hash: module(5),
        payload: Bytes::from_static(b"\0asm"),
    };
    assert!(h.said(SECOND, copy).is_empty());
    let compiled = Input::Prepared {
        hash: module(5),
        result: Ok("m5"),
    };
    assert_eq!(
        h.said(SECOND, compiled),
        ["execute a/1 on m5", "execute b/1 on m5"]
    );
}

#[test]
fn a_module_that_does_not_match_its_hash_is_unavailable_and_one_that_does_not_compile_is_a_rejected_run()
 {
    let mut h = Harness::online(4);
    for (task, m) in [("a", 5), ("b", 6)] {
        let Some(Action::Start(job)) = h.step(SECOND, h.assign(task, 1, m)).pop() else {
            panic!("not started");
        };
        h.step(SECOND, Input::NotCached(job));
    }
    let mismatch = Input::Prepared {
        hash: module(5),
        result: Err(ExecError::HashMismatch {
            expected: module(5),
            actual: module(9),
        }),
    };
    assert_eq!(
        h.said(SECOND, mismatch),
        ["refuse a/1 ModuleUnavailable admitted=true"]
    );
    let invalid = Input::Loaded {
        hash: module(6),
        result: Err(ExecError::Invalid("no export".into())),
    };
    assert_eq!(h.said(SECOND, invalid), ["reject b/1"]);
}

#[test]
fn a_report_made_offline_is_written_to_disk_then_published_and_deleted_once_delivered() {
    let mut h = Harness::new(4, Some(coordinator().public_key()), vec![]);
    h.step(Duration::ZERO, Input::Connected);
    let a = h.assign("a", 1, 1);
    h.step(SECOND, a);
    let lost = Input::Lost {
        resend: vec![],
        error: "gone".into(),
    };
    assert!(h.said(SECOND, lost).is_empty());
    assert_eq!(h.said(SECOND, finished("a", 1, true)), ["write #0"]);
    assert!(h.said(2 * SECOND, Input::Retry).is_empty());
    let back = h.said(3 * SECOND, Input::Connected);
    assert!(back.contains(&"publish report #0".to_string()), "{back:?}");
    assert_eq!(h.said(3 * SECOND, Input::Delivered(0)), ["remove #0"]);
    assert_eq!(h.node.outbox_len(), 0);
}

#[test]
fn a_report_the_broker_has_not_taken_within_write_after_is_stored_and_one_it_took_never_is() {
    let mut h = Harness::online(4);
    for task in ["a", "b"] {
        let assign = h.assign(task, 1, 1);
        h.step(SECOND, assign);
        h.step(SECOND, finished(task, 1, true));
    }
    assert!(h.said(SECOND, Input::Delivered(1)).is_empty());
    let early = SECOND + outbox::WRITE_AFTER / 2;
    assert!(h.said(early, Input::Retry).is_empty());
    assert_eq!(
        h.said(SECOND + outbox::WRITE_AFTER, Input::Retry),
        ["write #0"]
    );
}

#[test]
fn a_report_the_client_could_not_queue_or_lost_with_the_connection_goes_again() {
    let mut h = Harness::online(4);
    let a = h.assign("a", 1, 1);
    h.step(SECOND, a);
    assert_eq!(
        h.said(SECOND, finished("a", 1, true)),
        ["publish report #0"]
    );
    assert!(h.said(SECOND, Input::Unqueued(0)).is_empty());
    assert_eq!(h.said(SECOND, Input::Retry), ["publish report #0"]);
    let lost = Input::Lost {
        resend: vec![0],
        error: "reset".into(),
    };
    assert_eq!(h.said(SECOND, lost), ["write #0"]);
    let back = h.said(2 * SECOND, Input::Connected);
    assert!(back.contains(&"publish report #0".to_string()), "{back:?}");
}

#[test]
fn reports_left_on_disk_by_an_earlier_run_go_first_and_new_ones_number_after_them() {
    let stored = vec![(7, b"old".to_vec())];
    let mut h = Harness::new(4, Some(coordinator().public_key()), stored);
    let connected = h.said(Duration::ZERO, Input::Connected);
    assert!(connected.contains(&"publish report #7".to_string()));
    let a = h.assign("a", 1, 1);
    h.step(SECOND, a);
    assert_eq!(
        h.said(SECOND, finished("a", 1, true)),
        ["publish report #8"]
    );
    // Already on disk: delivered means deleted.
    assert_eq!(h.said(SECOND, Input::Delivered(7)), ["remove #7"]);
}

#[test]
fn shutdown_refuses_new_work_waits_for_running_tasks_then_says_offline_flushes_and_disconnects() {
    let mut h = Harness::online(4);
    h.step(SECOND, reading(50));
    let (a, b) = (h.assign("a", 1, 1), h.assign("b", 1, 1));
    h.step(SECOND, a);
    assert!(h.said(SECOND, Input::Shutdown).is_empty());
    assert_eq!(
        h.node.phase(),
        Phase::Draining {
            until: h.t0 + SECOND + GRACE
        }
    );
    assert_eq!(
        h.said(SECOND, b),
        ["refuse b/1 ShuttingDown admitted=false"]
    );
    assert!(
        h.said(SECOND, Input::Tick).is_empty(),
        "no telemetry while stopping"
    );
    // The refusal's report keeps the outbox busy, so flushing waits for the broker.
    assert_eq!(
        h.said(SECOND, finished("b", 1, false)),
        ["publish report #0"]
    );
    assert_eq!(
        h.said(2 * SECOND, finished("a", 1, true)),
        ["publish report #1", "status offline"]
    );
    assert!(matches!(h.node.phase(), Phase::Flushing { .. }));
    assert!(h.said(2 * SECOND, Input::Delivered(0)).is_empty());
    assert_eq!(h.said(2 * SECOND, Input::Delivered(1)), ["disconnect"]);
    assert_eq!(h.said(2 * SECOND, Input::Closed), ["finish"]);
    assert_eq!(h.node.phase(), Phase::Finished);
    assert!(
        h.said(3 * SECOND, Input::Connected).is_empty(),
        "finished is final"
    );
}

#[test]
fn shutdown_abandons_tasks_after_the_grace_and_leaves_undelivered_reports_on_disk() {
    let mut h = Harness::online(4);
    let (a, b) = (h.assign("a", 1, 1), h.assign("b", 1, 1));
    h.step(SECOND, a);
    h.step(SECOND, b);
    h.step(SECOND, finished("b", 1, true));
    h.step(SECOND, Input::Shutdown);
    assert!(h.said(SECOND + GRACE / 2, Input::Timer).is_empty());
    assert_eq!(h.said(SECOND + GRACE, Input::Timer), ["status offline"]);
    let Some(Phase::Flushing { until }) = Some(h.node.phase()) else {
        panic!("{:?}", h.node.phase());
    };
    assert_eq!(h.node.next_deadline(), Some(until));
    assert_eq!(h.said(until - h.t0, Input::Timer), ["disconnect"]);
    // The disconnect never completes: after its wait, leave.
    let closing = h.node.next_deadline().unwrap() - h.t0;
    assert_eq!(h.said(closing, Input::Timer), ["write #0", "finish"]);
}

#[test]
fn an_idle_node_says_offline_and_disconnects_as_soon_as_it_is_asked_to_stop() {
    let mut h = Harness::online(4);
    assert_eq!(
        h.said(SECOND, Input::Shutdown),
        ["status offline", "disconnect"]
    );
    assert_eq!(h.said(SECOND, Input::Closed), ["finish"]);
}

#[test]
fn a_connection_that_ends_before_the_outbox_empties_leaves_the_reports_on_disk() {
    let mut h = Harness::online(4);
    let a = h.assign("a", 1, 1);
    h.step(SECOND, a);
    h.step(SECOND, finished("a", 1, true));
    assert_eq!(h.said(SECOND, Input::Shutdown), ["status offline"]);
    let flush = h.node.next_deadline().unwrap() - h.t0;
    assert_eq!(h.said(flush, Input::Timer), ["disconnect"]);
    assert_eq!(h.said(flush, Input::Closed), ["write #0", "finish"]);
}

#[test]
fn losing_the_broker_while_flushing_ends_with_the_reports_on_disk() {
    let mut h = Harness::online(4);
    let a = h.assign("a", 1, 1);
    h.step(SECOND, a);
    h.step(SECOND, finished("a", 1, true));
    h.step(SECOND, Input::Shutdown);
    let lost = Input::Lost {
        resend: vec![0],
        error: "gone".into(),
    };
    assert_eq!(h.said(SECOND, lost), ["write #0", "finish"]);
}

#[test]
fn a_fetch_started_offline_subscribes_to_its_module_when_the_broker_returns() {
    let mut h = Harness::online(4);
    let Some(Action::Start(job)) = h.step(SECOND, h.assign("a", 1, 5)).pop() else {
        panic!("not started");
    };
    let lost = Input::Lost {
        resend: vec![],
        error: "gone".into(),
    };
    h.step(SECOND, lost);
    h.step(SECOND, Input::NotCached(job));
    let absent = Input::Loaded {
        hash: module(5),
        result: Ok(None),
    };
    assert!(
        h.said(SECOND, absent).is_empty(),
        "offline: nothing to subscribe yet"
    );
    let back = h.said(2 * SECOND, Input::Connected);
    assert!(back.contains(&"subscribe module 5".to_string()), "{back:?}");
}

#[test]
fn a_module_found_on_disk_runs_at_once() {
    let mut h = Harness::online(4);
    let Some(Action::Start(job)) = h.step(SECOND, h.assign("a", 1, 5)).pop() else {
        panic!("not started");
    };
    h.step(SECOND, Input::NotCached(job));
    let found = Input::Loaded {
        hash: module(5),
        result: Ok(Some("m5")),
    };
    assert_eq!(h.said(SECOND, found), ["execute a/1 on m5"]);
}

#[test]
fn modules_the_node_cannot_get_count_against_its_breaker_until_it_opens() {
    let mut h = Harness::online(64);
    let max = SafetyPolicy::default().max_errors;
    for i in 0..=max {
        let task = format!("t{i}");
        let a = h.assign(&task, 1, 1);
        h.step(SECOND, a);
        let Input::Finished(mut f) = finished(&task, 1, true) else {
            unreachable!()
        };
        f.outcome = refusal_outcome(Refusal::ModuleUnavailable);
        h.step(SECOND, Input::Finished(f));
    }
    let next = h.assign("next", 1, 1);
    let refused = h.step(SECOND, next);
    assert!(
        matches!(
            refused.as_slice(),
            [Action::Refuse {
                refusal: Refusal::Breaker(TripReason::TooManyErrors { .. }),
                ..
            }]
        ),
        "{refused:?}"
    );
}

#[test]
fn a_probe_stopped_by_the_wall_clock_frees_the_probe_slot_for_the_next_task() {
    let mut h = Harness::online(4);
    let cooldown = Duration::from_millis(SafetyPolicy::default().cooldown_ms);
    h.step(SECOND, reading(95));
    h.step(SECOND, Input::Tick);
    h.step(2 * SECOND, reading(50));
    let after = 2 * SECOND + cooldown;
    let probe = h.assign("probe", 1, 1);
    assert_eq!(h.said(after, probe), ["start probe/1"]);
    let Input::Finished(mut timed_out) = finished("probe", 1, true) else {
        unreachable!()
    };
    timed_out.outcome = device_outcome(Exit::TimedOut);
    h.step(after, Input::Finished(timed_out));
    let next = h.assign("next", 1, 1);
    assert_eq!(h.said(after, next), ["start next/1"], "probes again");
}

#[test]
fn a_shutdown_refuses_the_jobs_waiting_for_a_module() {
    let mut h = Harness::online(4);
    let Some(Action::Start(job)) = h.step(SECOND, h.assign("a", 1, 5)).pop() else {
        panic!("not started");
    };
    h.step(SECOND, Input::NotCached(job));
    h.step(
        SECOND,
        Input::Loaded {
            hash: module(5),
            result: Ok(None),
        },
    );
    assert_eq!(
        h.said(SECOND, Input::Shutdown),
        [
            "unsubscribe module 5",
            "refuse a/1 ShuttingDown admitted=true"
        ]
    );
}

#[test]
fn an_overheated_reading_opens_the_breaker_and_work_is_refused_with_the_reason() {
    let mut h = Harness::online(4);
    let said = h.said(SECOND, reading(95));
    assert_eq!(said[0], "sampled Open");
    let a = h.assign("a", 1, 1);
    let refused = h.step(SECOND, a);
    assert!(
        matches!(
            refused.as_slice(),
            [Action::Refuse {
                refusal: Refusal::Breaker(TripReason::Overheated { .. }),
                admitted: false,
                ..
            }]
        ),
        "{refused:?}"
    );
}

#[test]
fn telemetry_is_followed_by_a_ping_and_every_third_one_by_a_large_ping() {
    let mut h = Harness::online(4);
    let mut pings = Vec::new();
    for i in 0..4u32 {
        let at = SECOND * (i + 1);
        if i > 0 {
            assert_eq!(h.said(at, Input::Tick), ["sample running=0"]);
            assert!(h.said(at, Input::Tick).is_empty(), "one sample at a time");
        }
        let said = h.said(at, reading(50));
        assert_eq!(said[..2], ["sampled Closed", "telemetry"]);
        pings.push(said[2].clone());
    }
    assert_eq!(
        pings,
        ["ping 100", "large ping 101", "ping 102", "ping 103"]
    );
}

#[test]
fn a_pong_from_the_pinned_coordinator_gives_the_latency_the_next_telemetry_reports() {
    let mut h = Harness::online(4);
    h.step(SECOND, reading(50));
    let pong = Pong::sign(&coordinator(), &h.id, 100);
    let pong = Input::Tasks(Envelope::new(Message::Pong(pong)).to_vec().into());
    assert!(h.said(SECOND + Duration::from_millis(3), pong).is_empty());
    h.step(2 * SECOND, Input::Tick);
    let sampled = h.step(2 * SECOND, reading(50));
    let Some(Action::Sampled(sample)) = sampled.first() else {
        panic!("{sampled:?}");
    };
    assert_eq!(sample.latency_us, Some(3000));
}

fn probe(node: &NodeId, nonce: u64, padding: usize) -> Input<Module> {
    let padding = vec![0; padding];
    let probe = ambient_core::Probe {
        node: *node,
        padding: &padding,
        nonce,
    };
    Input::Tasks(Envelope::new(Message::Probe(probe)).to_vec().into())
}

#[test]
fn the_coordinators_probe_is_answered_at_once_with_a_pong_the_node_signs() {
    let mut h = Harness::online(4);
    let out = h.step(SECOND, probe(&h.id, 42, 0));
    assert_eq!(out.iter().map(describe).collect::<Vec<_>>(), ["pong 42"]);
    let Action::Publish { payload, .. } = &out[0] else {
        unreachable!()
    };
    let Message::Pong(pong) = Envelope::decode(payload).unwrap().message else {
        unreachable!()
    };
    assert_eq!(pong.signer, Identity::from_secret(&[7; 32]).public_key());
    assert_eq!(pong.verify(&h.id), Ok(()));
    // A probe for another node is not this node's to answer.
    assert!(
        h.said(2 * SECOND, probe(&NodeId([9; 16]), 43, 0))
            .is_empty()
    );
    assert_eq!(h.node.dropped_frames, 1);
}

#[test]
fn a_simulated_board_holds_its_pong_back_by_its_links_latency_and_bandwidth() {
    let mut h = Harness::online(4);
    // 2 ms round trips, 8 Mbit/s: 1,000 bytes take 1 ms more.
    h.node.settings.link_offset = Some((2_000, 8_000));
    assert!(h.said(SECOND, probe(&h.id, 1, 1_000)).is_empty());
    let due = SECOND + Duration::from_millis(3);
    assert_eq!(h.node.next_deadline(), Some(h.t0 + due));
    assert!(
        h.said(due - Duration::from_micros(1), Input::Timer)
            .is_empty()
    );
    assert_eq!(h.said(due, Input::Timer), ["pong 1"]);
    assert_eq!(h.node.next_deadline(), None);
    // Held while the connection drops: not sent after it, where it would measure the outage.
    h.step(2 * SECOND, probe(&h.id, 2, 0));
    h.step(
        2 * SECOND,
        Input::Lost {
            resend: vec![],
            error: "gone".into(),
        },
    );
    assert_eq!(h.node.next_deadline(), None);
    h.step(3 * SECOND, Input::Connected);
    assert!(h.said(3 * SECOND, Input::Timer).is_empty());
    // However large the probe, a pong is held back at most a second.
    assert!(h.said(4 * SECOND, probe(&h.id, 3, 4 << 20)).is_empty());
    assert_eq!(h.node.next_deadline(), Some(h.t0 + 5 * SECOND));
}

#[test]
fn probes_closer_than_the_spacing_are_dropped_so_a_flood_costs_few_signatures() {
    let mut h = Harness::online(4);
    let mut answered = 0;
    for i in 0..100u64 {
        let at = SECOND + Duration::from_millis(i);
        answered += h.step(at, probe(&h.id, i, 0)).len();
    }
    // One per 50 ms over 100 ms.
    assert_eq!(answered, 2);
}

#[test]
fn a_sampler_that_fails_publishes_nothing_counts_an_error_and_is_asked_again_next_tick() {
    let mut h = Harness::online(4);
    assert!(h.said(SECOND, Input::SampleFailed).is_empty());
    assert_eq!(h.node.breaker.errors(), 1);
    assert_eq!(h.said(2 * SECOND, Input::Tick), ["sample running=0"]);
}

#[test]
fn a_failing_program_is_no_device_error_and_a_timeout_counts_neither_way() {
    for exit in [
        Exit::Ok,
        Exit::Trapped,
        Exit::OutOfFuel,
        Exit::OutOfMemory,
        Exit::ExitStatus(1),
        Exit::Rejected,
    ] {
        assert_eq!(device_outcome(exit), Some(true), "{exit:?}");
    }
    assert_eq!(device_outcome(Exit::TimedOut), None);
    assert_eq!(refusal_outcome(Refusal::ModuleUnavailable), Some(false));
    assert_eq!(refusal_outcome(Refusal::Busy), None);
}
