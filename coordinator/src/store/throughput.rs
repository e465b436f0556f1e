//! Rough write throughput on the machine at hand, with real fsyncs:
//! `cargo test -p ambient-coordinator --release store::throughput -- --ignored --nocapture`.
//! Set `AMBIENT_STORE_BENCH_DIR` to measure a particular disk (defaults to the temp directory).

use std::time::{Duration, Instant};

use ambient_core::{NodeId, TaskId};

use super::{NewTask, Payout, Store, TaskStatus};

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

fn task(i: usize) -> NewTask {
    NewTask {
        task_id: TaskId::new(&format!("task-{i:08}")).unwrap(),
        client: "bench".into(),
        spec_json: format!(
            r#"{{"module":"{}","input":"{}","entry":"run","limits":{{"memory_bytes":536870912,"timeout_ms":30000,"fuel":10000000000}}}}"#,
            "ab".repeat(32),
            // About a 28×28 greyscale image, base64: the digits demo's input.
            "A".repeat(1_048)
        ),
        submitted_ms: 1_700_000_000_000 + i as u64,
    }
}

#[test]
#[ignore = "measures fsync-bound throughput; run with --ignored --nocapture"]
fn write_throughput_single_versus_batched() {
    let dir = match std::env::var_os("AMBIENT_STORE_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let mut store = Store::open(&dir.path().join("bench.db")).unwrap();
    let node = NodeId([7; 16]);

    const SINGLE: usize = 500;
    let start = Instant::now();
    for i in 0..SINGLE {
        store.insert_tasks(&[task(i)]).unwrap();
    }
    let single = rate(SINGLE, start.elapsed());

    const BATCHED: usize = 20_000;
    let tasks: Vec<NewTask> = (SINGLE..SINGLE + BATCHED).map(task).collect();
    let start = Instant::now();
    for chunk in tasks.chunks(100) {
        store.insert_tasks(chunk).unwrap();
    }
    let batched = rate(BATCHED, start.elapsed());

    let start = Instant::now();
    for chunk in tasks.chunks(100) {
        let d: Vec<_> = chunk.iter().map(|t| (t.task_id.clone(), 1, node)).collect();
        store.record_dispatches(&d, 1).unwrap();
    }
    let dispatched = rate(BATCHED, start.elapsed());

    let start = Instant::now();
    for chunk in tasks.chunks(100) {
        let o: Vec<_> = chunk
            .iter()
            .map(|t| {
                (
                    t.task_id.clone(),
                    TaskStatus::Completed,
                    r#"{"output":"aGk="}"#.to_owned(),
                )
            })
            .collect();
        store.finish_tasks(&o).unwrap();
    }
    let finished = rate(BATCHED, start.elapsed());

    let start = Instant::now();
    for t in &tasks[..SINGLE] {
        store.settle(&t.task_id, "bench", &[(node, 1_000)]).unwrap();
    }
    let settled_single = rate(SINGLE, start.elapsed());

    let payouts: Vec<Payout> = tasks[SINGLE..]
        .iter()
        .map(|t| Payout {
            task_id: t.task_id.clone(),
            client: "bench".into(),
            payees: vec![(node, 1_000)],
        })
        .collect();
    let start = Instant::now();
    for chunk in payouts.chunks(100) {
        store.settle_many(chunk).unwrap();
    }
    let settled_batched = rate(payouts.len(), start.elapsed());

    let start = Instant::now();
    let mut one_tx = 0;
    for (chunk, t) in tasks.chunks(100).zip(0..20) {
        let mut b = store.batch().unwrap();
        for (k, nt) in chunk.iter().enumerate() {
            let mut nt = nt.clone();
            nt.task_id = TaskId::new(&format!("mixed-{t}-{k}")).unwrap();
            b.insert_task(&nt).unwrap();
            b.record_dispatch(&nt.task_id, 1, &node, 3).unwrap();
            b.finish_task(&nt.task_id, TaskStatus::Completed, "{}", 4)
                .unwrap();
            b.settle(&nt.task_id, "bench", &[(node, 1_000)]).unwrap();
            one_tx += 1;
        }
        b.commit().unwrap();
    }
    let mixed = rate(one_tx, start.elapsed());

    let start = Instant::now();
    let check = store.verify_ledger().unwrap();
    let verify = rate(check.entries as usize, start.elapsed());
    assert!(check.is_ok());

    println!("store throughput in {}:", dir.path().display());
    println!("  insert, one task per commit:        {single:>10.0} tasks/s");
    println!("  insert, 100 tasks per commit:       {batched:>10.0} tasks/s");
    println!("  record_dispatches, 100 per commit:  {dispatched:>10.0} dispatches/s");
    println!("  finish_tasks, 100 per commit:       {finished:>10.0} tasks/s");
    println!("  settle, one task per commit:        {settled_single:>10.0} settlements/s");
    println!("  settle_many, 100 per commit:        {settled_batched:>10.0} settlements/s");
    println!("  insert+dispatch+finish+settle, 100 tasks per Batch: {mixed:>10.0} tasks/s");
    println!(
        "  verify_ledger:                      {verify:>10.0} entries/s ({} entries)",
        check.entries
    );
}
