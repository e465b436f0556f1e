//! The coordinator's HTTP API with real processes: a task submitted over HTTP runs on a real
//! agent, and every view, the metrics (the coordinator's and the agent's) and the dashboard's
//! frames show it.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn get(c: &Coordinator, path: &str) -> (u16, Value) {
    let (status, body) = http(&c.http_url, "GET", path, b"");
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("GET {path}: {e}: {}", String::from_utf8_lossy(&body)));
    (status, json)
}

/// The first `frame` event of `GET /api/stream`, read off the open stream.
fn first_streamed_frame(c: &Coordinator) -> Value {
    use std::io::{BufRead as _, BufReader, Write as _};
    let addr = c.http_url.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(stream, "GET /api/stream HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut lines = BufReader::new(stream).lines();
    let status = lines.next().unwrap().unwrap();
    assert!(status.contains(" 200 "), "{status}");
    let mut event = None;
    for line in lines {
        let line = line.expect("a frame within 30 s");
        if let Some(name) = line.strip_prefix("event: ") {
            event = Some(name.to_owned());
        } else if let Some(data) = line.strip_prefix("data: ")
            && event.as_deref() == Some("frame")
        {
            return serde_json::from_str(data).unwrap();
        }
    }
    panic!("the stream ended without a frame");
}

/// An agent serving its metrics on a port of its choosing, and the URL it logged for them.
fn agent_with_metrics(c: &Coordinator, dir: &std::path::Path) -> (Proc, String) {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin("ambient-agent"))
        .args([
            "--broker",
            &c.url,
            "--simulate",
            "pi5",
            "--metrics",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(dir)
        .env("AMBIENT_AGENT_TELEMETRY_INTERVAL_MS", "300")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ambient-agent");
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    // Reads the log to its end, so the agent never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(at) = line.find("metrics at http://") {
                let url = line[at + "metrics at ".len()..].split_whitespace().next();
                let _ = tx.send(url.unwrap_or_default().to_owned());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the agent logs its metrics address");
    let proc = Proc {
        child,
        name: "agent pi5 with metrics".into(),
    };
    (proc, url)
}

fn post(c: &Coordinator, body: &[u8]) -> (u16, Value) {
    let (status, body) = http(&c.http_url, "POST", "/api/tasks", body);
    (status, serde_json::from_slice(&body).unwrap())
}

#[test]
fn a_task_posted_over_http_runs_and_every_view_metric_and_dashboard_frame_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, None);
    wait_until(
        Duration::from_secs(30),
        || get(&c, "/healthz").0 == 200,
        || format!("a healthy coordinator: {:?}", get(&c, "/healthz")),
    );
    let (_agent, agent_metrics) = agent_with_metrics(&c, &dir.path().join("a"));
    c.wait_for_nodes(1);

    // Refused at once, with the intake's codes.
    let (status, bad) = post(&c, b"{\"task_id\": ");
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (400, Some("bad_json"))
    );
    let mut zero_fuel = spin_task("no-fuel", 10);
    zero_fuel.limits.as_mut().unwrap().fuel = Some(0);
    let (status, bad) = post(&c, &serde_json::to_vec(&zero_fuel).unwrap());
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (400, Some("bad_limits"))
    );

    let (status, accepted) = post(
        &c,
        &serde_json::to_vec(&spin_task("over-http", 10)).unwrap(),
    );
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["task_id"], "over-http");
    assert_eq!(accepted["events"], "ambient/v1/tasks/over-http/result");
    wait_until(
        Duration::from_secs(60),
        || get(&c, "/api/tasks/over-http").1["result"]["status"] == "completed",
        || format!("the task completed: {}", get(&c, "/api/tasks/over-http").1),
    );
    let (_, task) = get(&c, "/api/tasks/over-http");
    assert_eq!(task["status"], "completed");
    let node = task["result"]["nodes"][0].as_str().unwrap().to_owned();

    let (_, recent) = get(&c, "/api/tasks?status=completed&limit=5");
    assert!(
        recent
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["task_id"] == "over-http")
    );
    assert_eq!(get(&c, "/api/tasks?status=lost").0, 400);
    assert_eq!(get(&c, "/api/tasks/never-submitted").0, 404);

    let (_, nodes) = get(&c, "/api/nodes");
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 1);
    assert!(nodes["dropped"].is_object());
    let (status, view) = get(&c, &format!("/api/nodes/{node}"));
    assert_eq!((status, view["node"].as_str()), (200, Some(node.as_str())));
    assert_eq!(get(&c, "/api/nodes/not-hex").0, 400);
    assert_eq!(get(&c, &format!("/api/nodes/{}", "0".repeat(32))).0, 404);

    let (_, balances) = get(&c, "/api/ledger");
    assert!(
        balances
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["account"].as_str().is_some_and(|a| a.contains(&node))),
        "{balances}"
    );
    let (status, text) = http(&c.http_url, "GET", "/metrics", b"");
    let text = String::from_utf8(text).unwrap();
    assert_eq!(status, 200);
    for line in [
        "ambient_tasks_ended_total{status=\"completed\"} 1",
        "ambient_journal_tasks{status=\"completed\"} 1",
        "ambient_nodes{online=\"true\",breaker=\"closed\"} 1",
        "ambient_broker_connected 1",
        "ambient_task_latency_seconds_count 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }

    // The agent's own metrics: the run, its fuel, and a closed breaker.
    let base = agent_metrics.strip_suffix("/metrics").unwrap();
    let scrape = || {
        let (status, text) = http(base, "GET", "/metrics", b"");
        assert_eq!(status, 200);
        String::from_utf8(text).unwrap()
    };
    let fuel = task["result"]["receipts"][0]["fuel_used"].as_u64().unwrap();
    let lines = [
        "ambient_agent_executions_total{exit=\"ok\"} 1".to_owned(),
        format!("ambient_agent_fuel_total {fuel}"),
        "ambient_agent_breaker{state=\"closed\"} 1".to_owned(),
        // Once the broker has acknowledged the report.
        "ambient_agent_outbox_reports 0".to_owned(),
    ];
    wait_until(
        Duration::from_secs(30),
        || {
            let text = scrape();
            lines.iter().all(|line| text.lines().any(|l| l == line))
        },
        || format!("{lines:?} in\n{}", scrape()),
    );
    assert_eq!(http(base, "GET", "/", b"").0, 404);

    let (status, check) = get(&c, "/api/ledger/verify");
    assert_eq!(status, 200, "{check}");
    assert_eq!(
        check["entries"], 1,
        "one transfer: the client pays the node"
    );

    // The dashboard: the page, one frame as JSON, and the same frame over the live stream.
    let (status, page) = http(&c.http_url, "GET", "/", b"");
    let page = String::from_utf8(page).unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("new EventSource(\"api/stream\")"), "{page}");
    assert!(
        !page.contains("://cdn"),
        "the page fetches nothing from elsewhere"
    );
    let (status, frame) = get(&c, "/api/dashboard");
    assert_eq!(status, 200, "{frame}");
    let streamed = first_streamed_frame(&c);
    for frame in [frame, streamed] {
        assert_eq!(frame["nodes"][0]["node"], node.as_str(), "{frame}");
        assert_eq!(frame["tasks_by_status"]["completed"], 1);
        let item = &frame["feed"][0];
        assert_eq!(
            (
                &item["task_id"],
                &item["status"],
                &item["nodes"][0],
                &item["verdict"]
            ),
            (
                &Value::from("over-http"),
                &Value::from("completed"),
                &Value::from(node.as_str()),
                &Value::from("receipt")
            ),
            "{frame}"
        );
        let completed: u64 = frame["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["completed"].as_u64().unwrap())
            .sum();
        assert_eq!(completed, 1, "the chart counts the task once: {frame}");
        assert_eq!(frame["ledger"]["balanced"], true);
        assert_eq!(frame["ledger"]["first_bad_entry"], Value::Null);
        assert!(frame["balances"].as_array().unwrap().len() >= 2);
    }
}
