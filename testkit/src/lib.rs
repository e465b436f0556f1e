//! What the tests and `ambient bench` share, in one place: a private mosquitto on a free
//! loopback port ([`Mosquitto`]), the embedded broker on one ([`EmbeddedBroker`]), free ports,
//! and the small WebAssembly modules they run ([`wat`]).
//!
//! ```no_run
//! let broker = ambient_testkit::Mosquitto::builder().persistent().start()?;
//! println!("clients connect to {}", broker.url());
//! # Ok::<(), ambient_testkit::Error>(())
//! ```
//!
//! A test that needs mosquitto uses [`Mosquitto::required`]: it fails, never skips, where
//! mosquitto is not installed. `AMBIENT_TEST_LOGS=1` makes mosquitto log everything to
//! [`Mosquitto::log`], which a failed start includes in its error.

mod embedded;

pub use embedded::EmbeddedBroker;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long mosquitto may take to listen after it is spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why mosquitto could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No mosquitto executable in the usual places or on `PATH`.
    #[error(
        "mosquitto is not installed (looked in /usr/sbin, /usr/bin, /usr/local/sbin and PATH): apt-get install mosquitto"
    )]
    NotInstalled,
    /// Writing its configuration or spawning it failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// It exited, or did not listen in time.
    #[error("mosquitto did not listen on port {port}: {log}")]
    DidNotListen {
        /// The port it was configured for.
        port: u16,
        /// Its log, trimmed.
        log: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A loopback port nobody listens on now (bound, then released), never 1883, which a real
/// broker may want.
///
/// # Panics
/// When no loopback port can be bound at all.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if port != 1883 {
            return port;
        }
    }
}

/// The mosquitto executable: in `/usr/sbin`, `/usr/bin`, `/usr/local/sbin`, or on `PATH`.
pub fn mosquitto_binary() -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin"]
        .into_iter()
        .map(PathBuf::from)
        .chain(
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths),
        )
        .map(|dir| dir.join("mosquitto"))
        .find(|p| p.is_file())
}

/// How to start a [`Mosquitto`]: see [`Mosquitto::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    port: Option<u16>,
    persistent: bool,
    settings: String,
}

impl Builder {
    /// Listens on `port` instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Keeps sessions and queued messages across [`Mosquitto::stop`] and
    /// [`Mosquitto::restart`] (`persistence true`, in its own directory).
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// Replaces the default `allow_anonymous true` with these mosquitto.conf lines (for the
    /// listener and the broker: passwords, ACLs, a second listener).
    pub fn settings(mut self, lines: &str) -> Self {
        self.settings = lines.to_owned();
        self
    }

    /// Writes the configuration and starts mosquitto; returns once it accepts connections.
    ///
    /// # Errors
    /// [`Error`]: not installed, the configuration cannot be written, or it did not listen
    /// (with its log).
    pub fn start(self) -> Result<Mosquitto, Error> {
        let binary = mosquitto_binary().ok_or(Error::NotInstalled)?;
        let dir = tempfile::tempdir().map_err(io("create a directory for mosquitto"))?;
        let port = self.port.unwrap_or_else(free_port);
        let persistence = if self.persistent {
            format!(
                "persistence true\npersistence_location {}/\n",
                dir.path().display()
            )
        } else {
            "persistence false\n".into()
        };
        let log_all = std::env::var_os("AMBIENT_TEST_LOGS").is_some();
        // `user root` keeps a root-started mosquitto from switching to a user that cannot
        // write the temporary directory; it does nothing for other users. The queue is large
        // because a coordinator working through a batch must not have submissions dropped.
        let conf = format!(
            "listener {port} 127.0.0.1\n{}\nuser root\n{persistence}set_tcp_nodelay true\n\
             max_queued_messages 1000000\n{}",
            self.settings.trim_end(),
            if log_all { "log_type all\n" } else { "" },
        );
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, conf).map_err(io(format!("write {}", path.display())))?;
        let mut broker = Mosquitto {
            binary,
            child: None,
            port,
            dir,
        };
        broker.spawn()?;
        Ok(broker)
    }
}

/// A mosquitto child process on a loopback port, killed when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    binary: PathBuf,
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Anonymous, not persistent, on a free port: see [`Builder`] for the rest.
    pub fn builder() -> Builder {
        Builder {
            port: None,
            persistent: false,
            settings: "allow_anonymous true".into(),
        }
    }

    /// [`Mosquitto::builder`] started as it is.
    ///
    /// # Errors
    /// See [`Builder::start`].
    pub fn start() -> Result<Self, Error> {
        Self::builder().start()
    }

    /// A started default mosquitto, for a test that cannot run without one.
    ///
    /// # Panics
    /// When it cannot start, saying why (so the test fails instead of skipping).
    pub fn required() -> Self {
        Self::start().unwrap_or_else(|e| panic!("this test needs mosquitto: {e}"))
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its directory: configuration, log, and persisted sessions.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Kills it at once (SIGKILL), as a crash would: nothing is saved.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it gracefully (SIGTERM), so a persistent one saves its sessions.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    /// Stops it if it runs, and starts it again on the same port and configuration (with the
    /// saved sessions, when persistent).
    ///
    /// # Errors
    /// See [`Builder::start`].
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<(), Error> {
        // mosquitto logs to stderr, configuration errors included.
        let log = self.dir.path().join("mosquitto.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("open {}", log.display())))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io(format!("start {}", self.binary.display())))?;
        let child = self.child.insert(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = child.try_wait().ok().flatten().is_some();
            if exited || Instant::now() >= deadline {
                self.kill();
                return Err(Error::DidNotListen {
                    port: self.port,
                    log: self.log().trim().to_owned(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// WebAssembly text of the small modules the tests and benchmarks run, in the plain ABI
/// (`alloc(len) -> ptr`, then `entry(ptr, len) -> (out_ptr << 32) | out_len`).
pub mod wat {
    /// The cheapest task the plain ABI allows: `run` returns an empty output. What it costs
    /// end to end is Ambient's own overhead.
    pub const TRIVIAL: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "run") (param i32 i32) (result i64) (i64.const 0)))"#;

    /// `reverse` returns its input reversed.
    pub const REVERSE: &str = r#"
(module
  (memory (export "memory") 1)
  (global $next (mut i32) (i32.const 1024))
  (func (export "alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $len)))
    (local.get $p))
  (func (export "reverse") (param $ptr i32) (param $len i32) (result i64)
    (local $out i32) (local $i i32)
    (local.set $out (global.get $next))
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (i32.store8
          (i32.add (local.get $out) (local.get $i))
          (i32.load8_u (i32.sub (i32.add (local.get $ptr) (local.get $len)) (i32.add (local.get $i) (i32.const 1)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32)) (i64.extend_i32_u (local.get $len)))))
"#;

    /// `spin` never returns: for time and fuel limits.
    pub const SPIN: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "spin") (param i32 i32) (result i64) (loop $l (br $l)) (i64.const 0)))
"#;

    /// `run` counts to the little-endian u64 in its input's first 8 bytes and returns the
    /// count: a task whose fuel and time grow with its input.
    pub const COUNT: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 16))
  (func (export "run") (param $p i32) (param $n i32) (result i64)
    (local $i i64) (local $end i64)
    (local.set $end (i64.load (local.get $p)))
    (block $done (loop $l
      (br_if $done (i64.ge_u (local.get $i) (local.get $end)))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br $l)))
    (i64.store (i32.const 64) (local.get $i))
    (i64.or (i64.shl (i64.const 64) (i64.const 32)) (i64.const 8))))
"#;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_mosquitto_accepts_connections_and_is_gone_once_dropped() {
        let broker = Mosquitto::required();
        let port = broker.port();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert_eq!(broker.url(), format!("mqtt://127.0.0.1:{port}"));
        drop(broker);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    #[test]
    fn a_configuration_mosquitto_rejects_fails_the_start_with_its_log() {
        let err = Mosquitto::builder()
            .settings("no_such_option true")
            .start()
            .unwrap_err();
        let Error::DidNotListen { log, .. } = &err else {
            panic!("{err}");
        };
        assert!(log.contains("no_such_option"), "{log}");
    }

    #[test]
    fn a_restarted_mosquitto_listens_on_the_same_port() {
        let mut broker = Mosquitto::builder().persistent().start().unwrap();
        let port = broker.port();
        broker.restart().unwrap();
        assert_eq!(broker.port(), port);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    }
}
