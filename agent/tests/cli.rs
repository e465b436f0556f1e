//! The `ambient-agent` binary: configuration precedence, errors, help, and signals.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use ambient_core::{Envelope, Message, topics};
use common::*;

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ambient-agent"));
    // Only what each test sets: no AMBIENT_AGENT_* from the caller's environment.
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

#[test]
fn print_config_shows_flags_over_the_environment_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "broker = \"mqtt://file:1883\"\ntelemetry_interval_ms = 2000\nshutdown_grace_ms = 1234\nlabels = [\"from-file\"]\n[safety]\nmax_errors = 7\n",
    )
    .unwrap();
    let out = agent()
        .arg("--config")
        .arg(&file)
        .args(["--broker", "mqtt://flag:1884", "--print-config"])
        .env("AMBIENT_AGENT_BROKER", "mqtt://env:1885")
        .env("AMBIENT_AGENT_TELEMETRY_INTERVAL_MS", "300")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("broker = \"mqtt://flag:1884\""), "{text}");
    assert!(text.contains("telemetry_interval_ms = 300"), "{text}");
    assert!(text.contains("shutdown_grace_ms = 1234"), "{text}");
    assert!(text.contains("labels = [\"from-file\"]"), "{text}");
    assert!(text.contains("max_errors = 7"), "{text}");
    assert!(
        text.contains("# Period of telemetry samples and pings, in milliseconds. Default 5,000."),
        "{text}"
    );
    // What it prints reads back as the same configuration.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &text).unwrap();
    let again = agent()
        .arg("--config")
        .arg(&printed)
        .arg("--print-config")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(again.stdout).unwrap(), text);
}

#[test]
fn a_bad_value_names_the_key_the_value_and_what_was_expected() {
    let out = agent()
        .arg("--print-config")
        .env("AMBIENT_AGENT_TELEMETRY_INTERVAL_MS", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "invalid value 1 for `telemetry_interval_ms`: expected 50 to 3600000 milliseconds"
        ),
        "{err}"
    );
    let out = agent()
        .args(["--print-config", "--simulate", "pi3"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`simulate`") && err.contains("visionfive2"),
        "{err}"
    );
}

#[test]
fn a_missing_config_file_is_an_error_naming_it() {
    let out = agent()
        .args(["--config", "/nonexistent/agent.toml", "--print-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
}

#[test]
fn help_has_examples() {
    let out = agent().arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("Examples:") && text.contains("--simulate pi4"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_joins_the_broker_and_says_offline_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let mut coord = Coordinator::connect(&broker.url(), "coord-cli").await;
    let state = dir.path().join("agent");
    let node = ambient_agent::load_identity(&state).unwrap().node_id();
    let mut child = agent()
        .args([
            "--broker",
            &broker.url(),
            "--simulate",
            "visionfive2",
            "--name",
            "cli",
        ])
        .arg("--state-dir")
        .arg(&state)
        .env("AMBIENT_AGENT_TELEMETRY_INTERVAL_MS", "100")
        .stderr(if std::env::var_os("AMBIENT_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .unwrap();
    coord
        .expect("the announce", |s| {
            match (topics::parse_node(&s.topic), Envelope::decode(&s.payload)) {
                (Some((n, topics::NodeTopic::Announce)), Ok(e)) if n == node => match e.message {
                    Message::Announce(a) => a
                        .announce
                        .profile
                        .filter(|p| p.as_str() == "visionfive2")
                        .map(|_| ()),
                    _ => None,
                },
                _ => None,
            }
        })
        .await;
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    coord
        .expect("status offline", |s| {
            (topics::parse_node(&s.topic) == Some((node, topics::NodeTopic::Status))
                && &s.payload[..] == b"offline")
                .then_some(())
        })
        .await;
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_connects_over_tls_trusting_the_system_roots() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A test CA (made the system's roots through SSL_CERT_FILE) and a server certificate for
    // localhost signed by it.
    let openssl = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(d)
            .stderr(Stdio::null())
            .status()
    };
    let ok = openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=ambient-test-ca",
    ])
    .is_ok_and(|s| s.success());
    assert!(
        ok,
        "openssl is needed for this test: apt-get install openssl"
    );
    assert!(
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=localhost"
        ])
        .unwrap()
        .success()
    );
    std::fs::write(d.join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    assert!(
        openssl(&[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.crt",
            "-days",
            "2",
            "-extfile",
            "ext"
        ])
        .unwrap()
        .success()
    );
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {0}/ca.crt\ncertfile {0}/srv.crt\nkeyfile {0}/srv.key\n",
        d.display()
    );
    // Mosquitto, for its TLS listener with a certificate made by openssl.
    let broker = mosquitto_with(&extra);
    let mut coord = Coordinator::connect(&broker.url(), "coord-tls").await;
    let state = d.join("agent");
    let node = ambient_agent::load_identity(&state).unwrap().node_id();
    let mut child = agent()
        .args(["--broker", &format!("mqtts://localhost:{tls_port}")])
        .arg("--state-dir")
        .arg(&state)
        .env("SSL_CERT_FILE", d.join("ca.crt"))
        .stderr(if std::env::var_os("AMBIENT_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .unwrap();
    coord
        .expect("the announce, sent over TLS", |s| {
            (topics::parse_node(&s.topic) == Some((node, topics::NodeTopic::Announce)))
                .then_some(())
        })
        .await;
    let _ = child.kill();
    let _ = child.wait();
}
