//! Both daemons speak systemd's notify protocol (`Type=notify`, `WatchdogSec=`): each test binds
//! the datagram socket systemd would pass in `NOTIFY_SOCKET`, starts the real binary with it, and
//! reads what arrives: READY=1 once the daemon serves, WATCHDOG=1 pings, STOPPING=1 on SIGTERM.
//! (The socket keeps what arrived while a test waited for the process to exit.)

mod common;

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The watchdog timeout the tests hand the daemons, in microseconds: they ping every half of it.
const WATCHDOG_USEC: &str = "200000";

/// systemd's end of the notify protocol: a datagram socket in a private directory.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        // A bound on a hang, not a timing assertion: a daemon that never notifies fails here.
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Self {
            socket,
            path,
            _dir: dir,
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// The next message, one `KEY=value` line per state.
    fn next(&self, waiting_for: &str) -> String {
        let mut buf = [0u8; 512];
        let n = self
            .socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no message while waiting for {waiting_for}: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Reads until `expected` arrives; watchdog pings may come first.
    fn skip_pings_until(&self, expected: &str) {
        loop {
            match self.next(expected).as_str() {
                m if m == expected => return,
                "WATCHDOG=1\n" => continue,
                other => panic!("expected {expected:?}, got {other:?}"),
            }
        }
    }
}

#[test]
fn the_coordinator_is_ready_once_broker_and_journal_are_open_then_pings_and_says_stopping() {
    let notify = NotifySocket::bind();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new(bin("ambient"))
        .args(["coordinator", "--http", "off"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.path())
        .env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ambient coordinator");
    let mut coordinator = Proc {
        child,
        name: "coordinator".into(),
    };

    assert_eq!(notify.next("READY=1"), "READY=1\n");
    assert!(
        dir.path().join("ambient.db").exists(),
        "READY=1 before the journal was opened"
    );
    TcpStream::connect(("127.0.0.1", port)).expect("the broker accepts once READY=1 is sent");

    assert_eq!(notify.next("a watchdog ping"), "WATCHDOG=1\n");
    assert_eq!(notify.next("a second ping"), "WATCHDOG=1\n");

    let status = coordinator
        .terminate()
        .expect("the coordinator exits after SIGTERM");
    assert!(status.success(), "{status}");
    notify.skip_pings_until("STOPPING=1\n");
}

#[test]
fn the_agent_is_ready_with_its_identity_while_no_broker_answers_then_pings_and_says_stopping() {
    let notify = NotifySocket::bind();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("agent");
    // Nothing listens on port 1 (and no other test's broker can appear there): the agent keeps
    // retrying, and is ready all the same.
    let nobody = "mqtt://127.0.0.1:1";
    let notify_path = notify.path().to_str().expect("a UTF-8 temporary path");
    let mut agent = agent_with_env(
        nobody,
        &state,
        "pi4",
        &[
            ("NOTIFY_SOCKET", notify_path),
            ("WATCHDOG_USEC", WATCHDOG_USEC),
        ],
    );

    assert_eq!(notify.next("READY=1"), "READY=1\n");
    assert!(
        state.join(ambient_agent::IDENTITY_FILE).exists(),
        "READY=1 before the identity key was created"
    );

    assert_eq!(notify.next("a watchdog ping"), "WATCHDOG=1\n");
    assert_eq!(notify.next("a second ping"), "WATCHDOG=1\n");

    let status = agent.terminate().expect("the agent exits after SIGTERM");
    assert!(status.success(), "{status}");
    notify.skip_pings_until("STOPPING=1\n");
}
