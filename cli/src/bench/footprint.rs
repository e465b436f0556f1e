//! Footprint (section 5): binary sizes, and the agent's resident memory when idle beside that of an
//! idle `sleep`.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::e2e::RawClient;
use super::harness::{find_on_path, progress};
use super::report::{Figure, Status};

pub(super) const FOOTPRINT: &str = "5. footprint";

/// A binary's size in MiB: of a stripped copy when `strip` exists. Returns the size and whether
/// it was stripped.
fn binary_mib(path: &Path, scratch: &Path) -> anyhow::Result<(f64, bool)> {
    if let Some(strip) = find_on_path("strip") {
        let copy = scratch.join(path.file_name().context("binary path has no file name")?);
        std::fs::copy(path, &copy).with_context(|| format!("cannot copy {}", path.display()))?;
        let status = std::process::Command::new(strip)
            .arg(&copy)
            .stdin(Stdio::null())
            .status()?;
        if status.success() {
            return Ok((
                std::fs::metadata(&copy)?.len() as f64 / f64::from(1u32 << 20),
                true,
            ));
        }
    }
    Ok((
        std::fs::metadata(path)?.len() as f64 / f64::from(1u32 << 20),
        false,
    ))
}

/// VmRSS of a process, in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("cannot read /proc/PID/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

/// Kills a child process when dropped.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the agent binary against an embedded broker, waits until it announces and then 3 s
/// more, and reads its resident memory.
async fn agent_idle_rss(agent: &Path, scratch: &Path) -> anyhow::Result<f64> {
    let broker = ambient_broker::Broker::bind(
        "127.0.0.1:0".parse()?,
        ambient_broker::BrokerConfig::default(),
    )
    .await?;
    let url = format!("mqtt://{}", broker.local_addr());
    let stop = CancellationToken::new();
    let broker_task = tokio::spawn(broker.run(stop.clone().cancelled_owned()));
    let measured = async {
        let (tx, mut announced) = mpsc::unbounded_channel::<()>();
        let watcher = RawClient::connect(
            &url,
            "ambient-bench-footprint",
            "ambient/v1/nodes/+/announce",
            move |_, _| {
                let _ = tx.send(());
            },
        )
        .await?;
        let log = std::fs::File::create(scratch.join("agent.log"))?;
        let mut child = Reaper(
            std::process::Command::new(agent)
                .env("AMBIENT_AGENT_BROKER", &url)
                .env("AMBIENT_AGENT_STATE_DIR", scratch.join("agent-state"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot start {}", agent.display()))?,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::time::timeout(Duration::from_millis(100), announced.recv())
                .await
                .is_ok()
            {
                break;
            }
            if let Some(status) = child.0.try_wait()? {
                let log = std::fs::read_to_string(scratch.join("agent.log")).unwrap_or_default();
                anyhow::bail!(
                    "the agent exited ({status}) before announcing: {}",
                    log.trim()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent did not announce itself within 20 s"
            );
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = rss_mib(child.0.id())?;
        drop(child);
        watcher.close().await;
        anyhow::Ok(rss)
    }
    .await;
    stop.cancel();
    let _ = broker_task.await;
    measured
}

/// Resident memory of an idle `sleep`: the floor of any process on this machine.
async fn process_floor_rss() -> anyhow::Result<f64> {
    let child = Reaper(
        std::process::Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start `sleep`")?,
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    rss_mib(child.0.id())
}

pub(super) async fn section_footprint() -> anyhow::Result<Vec<Figure>> {
    progress("5. footprint");
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let dir = exe
        .parent()
        .context("the running executable has no directory")?;
    let scratch = tempfile::tempdir()?;
    let mut figures = Vec::new();
    let stripped_note = |stripped: bool| {
        if stripped {
            "stripped copy"
        } else {
            "UNSTRIPPED: `strip` not found"
        }
    };

    let (mib, stripped) = binary_mib(&exe, scratch.path())?;
    figures.push(
        Figure::new(
            FOOTPRINT,
            "size.ambient_mib",
            "binary size, ambient",
            mib,
            "MiB",
        )
        .note(format!("{}; {}", stripped_note(stripped), exe.display())),
    );

    let agent = dir.join("ambient-agent");
    if !agent.is_file() {
        let why = format!(
            "{} not found; build it beside this binary: cargo build --release -p ambient-agent",
            agent.display()
        );
        figures.push(Figure::not_measured(
            FOOTPRINT,
            "size.agent_mib",
            "binary size, ambient-agent",
            Status::Skipped,
            why.clone(),
        ));
        figures.push(Figure::not_measured(
            FOOTPRINT,
            "rss.agent_idle_mib",
            "agent idle RSS",
            Status::Skipped,
            why,
        ));
        return Ok(figures);
    }
    let (mib, stripped) = binary_mib(&agent, scratch.path())?;
    figures.push(
        Figure::new(
            FOOTPRINT,
            "size.agent_mib",
            "binary size, ambient-agent",
            mib,
            "MiB",
        )
        .note(stripped_note(stripped)),
    );
    let floor = process_floor_rss().await?;
    figures.push(match agent_idle_rss(&agent, scratch.path()).await {
        Ok(rss) => Figure::new(
            FOOTPRINT,
            "rss.agent_idle_mib",
            "agent idle RSS, 3 s after announcing",
            rss,
            "MiB",
        )
        .against(
            floor,
            "an idle `sleep` process (the floor of any process here)",
        ),
        Err(e) => Figure::not_measured(
            FOOTPRINT,
            "rss.agent_idle_mib",
            "agent idle RSS",
            Status::Failed,
            format!("{e:#}"),
        ),
    });
    Ok(figures)
}
