//! The `ambient` command line as a user meets it. (This file also makes `cargo test` build the
//! `ambient` binary that the end-to-end tests in `tests/` run.)

use std::process::Command;

fn ambient(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ambient"))
        .args(args)
        .output()
        .expect("run ambient")
}

#[test]
fn help_lists_every_command_with_examples() {
    let out = ambient(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["coordinator", "submit", "nodes", "tasks", "ledger", "demo"] {
        assert!(text.contains(cmd), "--help mentions {cmd}");
    }
    assert!(text.contains("Examples"));
}

#[test]
fn print_config_emits_toml_that_the_coordinator_accepts() {
    let out = ambient(&[
        "coordinator",
        "--print-config",
        "--strategy",
        "least-loaded",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("strategy = \"least-loaded\""));
    let raw: ambient_coordinator::RawConfig = toml::from_str(&text).expect("printed config parses");
    raw.validate().expect("printed config validates");
}

#[test]
fn an_unknown_strategy_is_refused_with_the_valid_ones() {
    let out = ambient(&[
        "coordinator",
        "--strategy",
        "fastest",
        "--data-dir",
        "/nonexistent",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("scheduling.strategy") && err.contains("round-robin"),
        "{err}"
    );
}

#[test]
fn read_commands_on_a_missing_database_say_how_to_create_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = ambient(&["nodes", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ambient coordinator"), "{err}");
}

#[test]
fn the_embedded_broker_explains_a_taken_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = ambient(&[
        "coordinator",
        "--listen",
        &addr,
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already in use") && err.contains("--broker"),
        "{err}"
    );
}

#[test]
fn a_taken_http_port_is_explained_with_what_to_do() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = ambient(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--http",
        &addr,
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HTTP API") && err.contains("--http off"),
        "{err}"
    );
}

#[test]
fn a_quick_end_to_end_bench_completes_every_section() {
    // Both brokers: the embedded one with its access rules, and mosquitto (which must be
    // installed, as for the end-to-end tests).
    let out = ambient(&["bench", "--quick", "--only", "e2e", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let failed: Vec<&serde_json::Value> = report["figures"]
        .as_array()
        .expect("figures")
        .iter()
        .filter(|f| f["status"] == "failed")
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(
        report["figures"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["section"] == "1. end to end, embedded broker" && f["value"].is_number()),
        "the embedded broker section measured something"
    );
}

#[test]
fn sim_reports_every_policy_as_json_and_the_same_flags_give_the_same_figures() {
    let args = [
        "sim",
        "--nodes",
        "30",
        "--tasks",
        "300",
        "--liars",
        "0.2",
        "--baseline",
        "--json",
    ];
    let out = ambient(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("a JSON array");
    let policies: Vec<&str> = reports
        .iter()
        .map(|r| r["verify"].as_str().unwrap())
        .collect();
    assert_eq!(
        policies,
        ["target:1e-4", "replicate:2"],
        "the default policy, then the baseline"
    );
    for r in &reports {
        assert_eq!(
            r["completed"].as_u64().unwrap() + r["failed"].as_u64().unwrap(),
            300
        );
        assert!(r["executions_per_task"].as_f64().unwrap() >= 1.0);
        let behaviours: Vec<&str> = r["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["behaviour"].as_str().unwrap())
            .collect();
        assert_eq!(behaviours, ["honest", "liar"]);
    }
    assert_eq!(ambient(&args).stdout, out.stdout, "deterministic");
}

#[test]
fn sim_refuses_shares_over_the_whole_pool_naming_them() {
    let out = ambient(&["sim", "--liars", "0.6", "--colluders", "0.6"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("more than every node"), "{err}");
}
