//! `ambient submit`: publish a module and tasks, optionally wait for verified results.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ambient_coordinator::client::{Client, Until};
use ambient_coordinator::{EventStatus, TaskEvent};
use ambient_coordinator::{LimitsJson, Submission};
use ambient_core::{Abi, MAX_INPUT_BYTES, MAX_MODULE_BYTES};
use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Args;

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ambient submit tasks/modules/digits.wasm --entry classify --input digit.bin --wait\n  ambient submit tasks/modules/wasi-upper.wasm --abi wasi --input-text hello --wait\n  ambient submit tasks/modules/digits.wasm --entry classify --inputs ./images/ --verify replicate:3 --wait --json\n\nWithout --wait, the command returns once the coordinator has journaled every task."
)]
pub struct SubmitArgs {
    /// The WASM module to run.
    module: PathBuf,
    /// Input bytes from a file.
    #[arg(long, conflicts_with_all = ["input_text", "inputs"])]
    input: Option<PathBuf>,
    /// Input as text.
    #[arg(long, conflicts_with = "inputs")]
    input_text: Option<String>,
    /// A directory: one task per file, a batch with a progress bar.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Submit the same input N times (a batch).
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Exported function to call (plain ABI).
    #[arg(long, default_value = "run")]
    entry: String,
    /// Calling convention: plain (memory, alloc, entry) or wasi (stdin to stdout).
    #[arg(long, default_value = "plain")]
    abi: String,
    /// weighted, round-robin, least-loaded or latency-aware [default: the coordinator's].
    #[arg(long)]
    strategy: Option<String>,
    /// receipt, replicate:K (K distinct nodes must agree), or target:E (as many nodes as it
    /// takes for the chance of a wrong result to fall to E, e.g. target:1e-4) [default: the
    /// coordinator's, `verification.policy`].
    #[arg(long)]
    verify: Option<String>,
    /// Fuel budget [default: 10^10].
    #[arg(long)]
    fuel: Option<u64>,
    /// Memory limit in bytes [default: 512 MiB].
    #[arg(long)]
    memory_bytes: Option<u64>,
    /// Wall-clock limit in milliseconds [default: 30000].
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Most to pay per task, in µcredits.
    #[arg(long)]
    max_fee: Option<u64>,
    /// The paying client's id.
    #[arg(long, env = "AMBIENT_CLIENT", default_value = "cli")]
    client: String,
    /// Wait for verified results and print them.
    #[arg(long)]
    wait: bool,
    /// Print events as JSON, one per line.
    #[arg(long)]
    json: bool,
    /// The coordinator's MQTT broker: mqtt://[user[:password]@]host[:port], or mqtts://… for TLS.
    #[arg(long, env = "AMBIENT_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// For mqtts://: PEM file of the CA certificates to trust (default: the system's).
    #[arg(long, env = "AMBIENT_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// For mqtts:// brokers that require a client certificate: its PEM file (with --key-file).
    #[arg(long, env = "AMBIENT_CERT_FILE", requires = "key_file")]
    cert_file: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "AMBIENT_KEY_FILE", requires = "cert_file")]
    key_file: Option<std::path::PathBuf>,
    /// Give up when no task makes progress (is accepted or ends) for this long, in seconds.
    /// Tasks without an `accepted` event are resubmitted every 3 s and after a reconnect.
    #[arg(long, default_value_t = 120)]
    wait_secs: u64,
}

/// Refuses, before anything is sent, a module the coordinator would refuse: over the size limit,
/// not binary WebAssembly, importing what the sandbox does not offer, or without what `abi`
/// and `entry` need (with a hint where the flags look wrong).
fn check_module(
    path: &std::path::Path,
    bytes: &[u8],
    abi: &str,
    entry: &str,
) -> anyhow::Result<()> {
    if bytes.len() > MAX_MODULE_BYTES {
        anyhow::bail!(
            "module {} is {} bytes, over the {MAX_MODULE_BYTES} byte limit",
            path.display(),
            bytes.len()
        );
    }
    let abi = match abi {
        "plain" => Abi::Plain,
        "wasi" => Abi::Wasi,
        other => anyhow::bail!("--abi {other:?} is not `plain` or `wasi`"),
    };
    ambient_core::inspect(bytes)
        .and_then(|module| module.check_call(abi, entry))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub async fn run(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let module = std::fs::read(&args.module)
        .with_context(|| format!("cannot read module {}", args.module.display()))?;
    check_module(&args.module, &module, &args.abi, &args.entry)?;
    // Each input with what names it in the output: its file in a directory batch.
    let mut names: Vec<Option<String>> = Vec::new();
    let inputs: Vec<Vec<u8>> = if let Some(dir) = &args.inputs {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read input directory {}", dir.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        names = files
            .iter()
            .map(|f| Some(f.display().to_string()))
            .collect();
        files
            .iter()
            .map(std::fs::read)
            .collect::<Result<_, _>>()
            .context("cannot read an input file")?
    } else if let Some(path) = &args.input {
        vec![
            std::fs::read(path).with_context(|| format!("cannot read input {}", path.display()))?;
            args.count
        ]
    } else {
        vec![args.input_text.clone().unwrap_or_default().into_bytes(); args.count]
    };
    if let Some(big) = inputs.iter().find(|i| i.len() > MAX_INPUT_BYTES) {
        anyhow::bail!(
            "an input is {} bytes, over the {MAX_INPUT_BYTES} byte limit of a task's input",
            big.len()
        );
    }
    let tls = ambient_mqtt::TlsFiles {
        ca_file: args.ca_file.clone(),
        cert_file: args.cert_file.clone(),
        key_file: args.key_file.clone(),
    };
    let mut client = Client::connect_with(&args.broker, &tls).await?;
    let hash = client.publish_module(&module).await?;
    let run_id = format!("{:08x}", rand::random::<u32>());
    let submissions: Vec<Submission> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| Submission {
            task_id: Some(format!("{}-{run_id}-{i}", args.client)),
            client_id: Some(args.client.clone()),
            module: Some(hash.to_hex().to_string()),
            abi: Some(args.abi.clone()),
            entry: Some(args.entry.clone()),
            input_b64: Some(B64.encode(input)),
            limits: Some(LimitsJson {
                memory_bytes: args.memory_bytes,
                timeout_ms: args.timeout_ms,
                fuel: args.fuel,
            }),
            strategy: args.strategy.clone(),
            verify: args.verify.clone(),
            max_fee: args.max_fee,
            ..Submission::default()
        })
        .collect();
    let n = submissions.len();
    let bar = (n > 1 && !args.json).then(|| {
        let bar = indicatif::ProgressBar::new(n as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tasks {per_sec} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let timeout = Duration::from_secs(args.wait_secs);
    let until = if args.wait {
        Until::Final
    } else {
        // Without --wait, return once every task is journaled (or rejected).
        Until::Accepted
    };
    let events = client
        .follow(&submissions, until, timeout, |_| {
            if let Some(b) = &bar {
                b.inc(1);
            }
        })
        .await?;
    if let Some(b) = bar {
        b.finish();
    }
    client.disconnect().await;
    let mut failures = 0;
    let mut out = std::io::stdout().lock();
    for (i, s) in submissions.iter().enumerate() {
        let id = s.task_id.as_deref().unwrap_or_default();
        let name = names.get(i).cloned().flatten();
        let label = name.as_deref().unwrap_or(id);
        match events.get(id) {
            Some(ev) => {
                if matches!(ev.status, EventStatus::Failed | EventStatus::Rejected) {
                    failures += 1;
                }
                print_event(&mut out, ev, args.json, n == 1, label)?;
            }
            None => {
                failures += 1;
                writeln!(out, "{label}: no answer within {} s", args.wait_secs)?;
            }
        }
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Output bytes for people: text as it is, a few bytes as numbers (`[8]`, a digit's label),
/// anything longer in hex with its length.
fn shown(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.is_empty() && s.chars().all(|c| !c.is_control() || c == '\n') => s.to_string(),
        _ if bytes.len() <= 16 => format!("{bytes:?}"),
        _ => format!("{} bytes: {}", bytes.len(), hex::encode(bytes)),
    }
}

/// Prints one final event; `label` names the task in batch lines (its input file, or its id).
fn print_event(
    out: &mut impl std::io::Write,
    ev: &TaskEvent,
    json: bool,
    single: bool,
    label: &str,
) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", serde_json::to_string(ev).unwrap_or_default());
    }
    match (&ev.status, &ev.output_b64, &ev.error) {
        (EventStatus::Completed, Some(b64), _) => {
            let shown = shown(&B64.decode(b64).unwrap_or_default());
            if single {
                writeln!(out, "{shown}")?;
                writeln!(
                    out,
                    "# task {} completed on {} (verified: {}), reward {} µcredits",
                    ev.task_id,
                    ev.nodes.join(", "),
                    ev.verdict
                        .as_ref()
                        .map(|v| v.policy.as_str())
                        .unwrap_or("-"),
                    ev.reward.unwrap_or(0)
                )
            } else {
                writeln!(out, "{label}: {shown}")
            }
        }
        (status, _, Some(e)) => writeln!(out, "{label}: {status:?}: {} ({})", e.message, e.code),
        (status, _, None) => writeln!(out, "{label}: {status:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn outputs_are_shown_as_text_as_small_numbers_or_as_hex_with_their_length() {
        assert_eq!(shown(b"HELLO\n"), "HELLO\n");
        assert_eq!(shown(&[8]), "[8]");
        assert_eq!(shown(&[]), "[]");
        assert_eq!(shown(&[0xff; 17]), format!("17 bytes: {}", "ff".repeat(17)));
    }
}
