//! Shared harness: real processes (coordinator, agents, mosquitto) on free ports, cleaned up on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ambient_coordinator::store::Store;
use ambient_core::{
    Announce, Engine, Envelope, Identity, Message, SignedAnnounce, SignedTelemetry, Telemetry,
    TelemetrySample, sign_message,
};

/// The path of a workspace binary, built by the same `cargo test --workspace` (the README's
/// test command). `cargo test -p ambient-e2e` alone runs whatever is in the target directory:
/// run `cargo test --workspace --no-run` first (it builds `ambient-agent` with the
/// `fault-injection` feature the fault tests need). A test never builds, so it never races one.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run the README's test command (`cargo test --workspace`), or `cargo test --workspace --no-run` before `cargo test -p ambient-e2e`",
        path.display()
    );
    path
}

/// A signed announce frame for `identity`: an aarch64 board with 4 cores, 4 GiB and 2 slots,
/// changed by `adjust`.
pub fn signed_announce(identity: &Identity, adjust: impl FnOnce(&mut Announce)) -> Vec<u8> {
    let mut announce = Announce {
        node: identity.node_id(),
        public_key: identity.public_key(),
        arch: "aarch64".try_into().unwrap(),
        cores: 4,
        mem_total_bytes: 4 << 30,
        engine: Engine::Wasmtime,
        agent_version: "0.1.0".try_into().unwrap(),
        labels: Default::default(),
        profile: None,
        max_concurrency: 2,
        fuel_per_s: None,
    };
    adjust(&mut announce);
    let signature = sign_message(identity, SignedAnnounce::TAG, &announce).unwrap();
    Envelope::new(Message::Announce(SignedAnnounce {
        announce,
        signature,
    }))
    .to_vec()
}

/// A signed telemetry frame for `identity` (agent run 1, sample number `seq`).
pub fn signed_telemetry(identity: &Identity, seq: u64, sample: TelemetrySample) -> Vec<u8> {
    telemetry_frame(identity, identity.node_id(), seq, sample)
}

/// A telemetry frame in `node`'s name, signed by `signer` (a forgery unless it is `node`'s key).
pub fn telemetry_frame(
    signer: &Identity,
    node: ambient_core::NodeId,
    seq: u64,
    sample: TelemetrySample,
) -> Vec<u8> {
    let telemetry = Telemetry {
        node,
        seq,
        boot_id: 1,
        sample,
    };
    let signature = sign_message(signer, SignedTelemetry::TAG, &telemetry).unwrap();
    Envelope::new(Message::Telemetry(SignedTelemetry {
        telemetry,
        signature,
    }))
    .to_vec()
}

/// Host and port of a broker URL.
pub fn host_port(url: &str) -> (String, u16) {
    let url: ambient_coordinator::BrokerUrl = url.parse().unwrap();
    (url.host().to_owned(), url.port())
}

/// MQTT options for a device that signs in as `identity` on `url`, as an agent does: client id
/// `ambient-agent-<node id>`, the node id as username and a fresh connect token as password.
pub fn device_options(url: &str, identity: &Identity) -> rumqttc::MqttOptions {
    let (host, port) = host_port(url);
    let node = identity.node_id();
    let mut opts = rumqttc::MqttOptions::new(format!("ambient-agent-{node}"), host, port);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let token = ambient_core::ConnectToken::sign(identity, &node.to_hex(), now_ms);
    opts.set_credentials(node.to_hex().as_str(), token.to_hex().as_str());
    opts
}

#[allow(unused_imports)]
pub use ambient_testkit::{Mosquitto, free_port};

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `ambient coordinator` as a child process.
pub struct Coordinator {
    pub proc: Proc,
    pub url: String,
    /// The embedded broker's TLS listener, when configured.
    pub tls_url: Option<String>,
    /// The HTTP API, `http://127.0.0.1:<port>`.
    pub http_url: String,
    pub data_dir: PathBuf,
}

/// `config` with tasks that name no policy checked by `receipt`, every node trusted from its
/// first result and no random spot checks (`verification.policy = "receipt"`,
/// `trust_after = 0`, `spot_check_permille = 0`), unless it sets `trust_after`
/// itself, which keeps the default checks. These tests are about delivery, faults and access:
/// a second, checking run of a task would change what they count (runs, payees, verdicts), and
/// a random one would make that change one run in twenty. Verification has its own tests (the
/// lying nodes in `faults.rs`, `trust.rs`, the dispatcher's unit tests and `ambient sim`).
fn trusting_from_the_start(config: &str) -> String {
    const CHECKS: &str = "policy = \"receipt\"\ntrust_after = 0\nspot_check_permille = 0";
    if config.contains("trust_after") {
        config.to_owned()
    } else if config.contains("[verification]") {
        config.replacen("[verification]", &format!("[verification]\n{CHECKS}"), 1)
    } else {
        format!("{config}\n[verification]\n{CHECKS}\n")
    }
}

impl Coordinator {
    /// Starts with the embedded broker on `port` (0 for any), or on `external` broker.
    pub fn start(data_dir: &Path, port: u16, external: Option<&str>) -> Coordinator {
        Self::start_with(data_dir, port, external, "")
    }

    /// As [`Coordinator::start`], with `config` (TOML) as its configuration file.
    pub fn start_with(
        data_dir: &Path,
        port: u16,
        external: Option<&str>,
        config: &str,
    ) -> Coordinator {
        std::fs::create_dir_all(data_dir).expect("create the data directory");
        let config_path = data_dir.join("coordinator.toml");
        std::fs::write(&config_path, trusting_from_the_start(config))
            .expect("write the configuration");
        let mut cmd = Command::new(bin("ambient"));
        cmd.arg("coordinator")
            .arg("--config")
            .arg(&config_path)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--http", "127.0.0.1:0"])
            .arg("-v");
        match external {
            Some(url) => cmd.args(["--broker", url]),
            None => cmd.args(["--listen", &format!("127.0.0.1:{port}")]),
        };
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ambient coordinator");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let (http_tx, http_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("HTTP API http://") {
                    let url: String = line[i + "HTTP API ".len()..]
                        .chars()
                        .take_while(|c| !c.is_whitespace())
                        .collect();
                    let _ = http_tx.send(url);
                }
                if !sent && let Some(i) = line.find("mqtt://").or_else(|| line.find("mqtts://")) {
                    let url_at = |i: usize| -> String {
                        line[i..]
                            .chars()
                            .take_while(|c| !c.is_whitespace() && *c != ',')
                            .collect()
                    };
                    let tls = line
                        .find(", TLS mqtts://")
                        .map(|j| url_at(j + ", TLS ".len()));
                    let _ = tx.send((url_at(i), tls));
                    sent = true;
                }
                if std::env::var_os("AMBIENT_E2E_LOGS").is_some() {
                    eprintln!("[coordinator] {line}");
                }
            }
        });
        let (url, tls_url) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("coordinator printed its broker URL");
        let http_url = http_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("coordinator printed its HTTP API's URL");
        Coordinator {
            proc: Proc {
                child,
                name: "coordinator".into(),
            },
            url,
            tls_url,
            http_url,
            data_dir: data_dir.to_path_buf(),
        }
    }

    pub fn db(&self) -> PathBuf {
        self.data_dir.join("ambient.db")
    }

    /// Waits until `n` nodes are online and have sent signed telemetry (so they can take work)
    /// in the coordinator's registry snapshot.
    pub fn wait_for_nodes(&self, n: usize) {
        wait_until(
            Duration::from_secs(60),
            || online_nodes(&self.db()) >= n,
            || format!("{n} nodes online"),
        );
    }
}

/// Nodes online with telemetry in the snapshot at `db`.
pub fn online_nodes(db: &Path) -> usize {
    let Ok(store) = Store::open_read_only(db) else {
        return 0;
    };
    store
        .node_views()
        .unwrap_or_default()
        .iter()
        .filter(|v| v.online && v.sample.is_some())
        .count()
}

/// Polls `cond` every 50 ms until it holds; panics after `limit` with what was awaited.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {}",
            what()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ambient-agent` as a child process with a simulated profile.
pub fn agent(url: &str, state_dir: &Path, profile: &str) -> Proc {
    agent_with_env(url, state_dir, profile, &[])
}

/// The node id and public key (hex) of the device whose state is in `state_dir`, as
/// `ambient-agent --print-node-id` prints them there, creating the identity if there is none.
pub fn device_identity(state_dir: &Path) -> (String, String) {
    let out = Command::new(bin("ambient-agent"))
        .arg("--print-node-id")
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .expect("run ambient-agent --print-node-id");
    let printed = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        printed
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in {printed:?}"))
    };
    (field("node id"), field("public key"))
}

/// As [`agent`], with extra environment variables (configuration keys, see the agent README).
pub fn agent_with_env(url: &str, state_dir: &Path, profile: &str, env: &[(&str, &str)]) -> Proc {
    agent_with(url, state_dir, profile, env, &[])
}

/// As [`agent_with_env`], with extra command-line arguments (`--fault …`: the `ambient-agent`
/// that `cargo test --workspace` builds has the `fault-injection` feature, through this
/// package's dev-dependency; a binary without it refuses the flag and the test fails).
pub fn agent_with(
    url: &str,
    state_dir: &Path,
    profile: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> Proc {
    if args.contains(&"--fault") {
        let help = Command::new(bin("ambient-agent"))
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("--fault"),
            "this ambient-agent was built without the fault-injection feature: build the binaries with `cargo test --workspace --no-run`, which enables it through this package"
        );
    }
    let child = Command::new(bin("ambient-agent"))
        .args(["--broker", url, "--simulate", profile, "--name", profile])
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .env("AMBIENT_AGENT_TELEMETRY_INTERVAL_MS", "300")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("AMBIENT_E2E_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("start ambient-agent");
    Proc {
        child,
        name: format!("agent {profile}"),
    }
}

/// One simulated agent per profile, each with its own state directory under `dir`.
pub fn agents(url: &str, dir: &Path, profiles: &[&str]) -> Vec<Proc> {
    profiles
        .iter()
        .enumerate()
        .map(|(i, p)| agent(url, &dir.join(format!("a{i}")), p))
        .collect()
}

/// The digits module and the first `n` held-out images as one input, with the native labels.
pub fn digits_batch(offset: usize, n: usize) -> (Vec<u8>, Vec<u8>) {
    let all: Vec<_> = ambient_digits::heldout().collect();
    let mut input = Vec::new();
    let mut native = Vec::new();
    for i in 0..n {
        let (img, _) = all[(offset + i) % all.len()];
        input.extend_from_slice(img);
        native.push(ambient_digits::classify(img));
    }
    (input, native)
}

#[allow(unused_imports)] // Not every test binary runs digits.
pub use ambient_agent::calibrate::DIGITS_WASM;

/// A plain-ABI module that counts to the little-endian u64 in its input, then returns that count.
/// A task running [`SPIN_WAT`] for `iterations` loops (it returns them), with room for long
/// runs: a trillion fuel, two minutes.
pub fn spin_task(id: &str, iterations: u64) -> ambient_coordinator::Submission {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    ambient_coordinator::Submission {
        task_id: Some(id.into()),
        client_id: Some("e2e".into()),
        module_b64: Some(b64.encode(wat::parse_str(SPIN_WAT).expect("SPIN_WAT is valid"))),
        input_b64: Some(b64.encode(iterations.to_le_bytes())),
        limits: Some(ambient_coordinator::LimitsJson {
            fuel: Some(1_000_000_000_000),
            timeout_ms: Some(120_000),
            memory_bytes: None,
        }),
        ..ambient_coordinator::Submission::default()
    }
}

#[allow(unused_imports)]
pub use ambient_testkit::wat::COUNT as SPIN_WAT;

/// One HTTP/1.1 request to `url` (`http://host:port`) over a plain socket; returns the status
/// code and the body.
pub fn http(url: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::{Read as _, Write as _};
    let addr = url.strip_prefix("http://").expect("an http:// URL");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP API");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, response[split + 4..].to_vec())
}
