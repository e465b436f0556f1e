//! Read commands: `ambient nodes`, `ambient tasks`, `ambient ledger`. They open the database
//! read-only, so they work while the service runs.

use std::process::ExitCode;

use ambient_coordinator::TaskEvent;
use ambient_coordinator::store::{Store, TaskStatus};
use ambient_core::BreakerState;
use clap::{Args, Subcommand};

use super::DataDir;

#[derive(Debug, Args)]
pub struct ReadArgs {
    #[command(flatten)]
    data: DataDir,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Columns: SCORE is the health score and BW, LAT, CPU, REP its terms (0 to 1); VERIF counts verified results, RUN the tasks running now.\n\nExamples:\n  ambient nodes --data-dir ./data\n  ambient nodes enrollment --data-dir ./data        # keys waiting for approval (allowlist mode)\n  ambient nodes approve 3f9a0c1d2e4b5a697887766554433221 --data-dir ./data\n  ambient nodes revoke 3f9a0c1d2e4b5a697887766554433221 --data-dir ./data"
)]
pub struct NodesArgs {
    #[command(subcommand)]
    command: Option<NodesCommand>,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// List keys waiting for approval ([enrollment] mode = "allowlist") and the verdicts given.
    Enrollment(ReadArgs),
    /// Admit a node from now on, in any enrollment mode; lifts a revocation.
    Approve(super::enrollment::VerdictArgs),
    /// Remove a node from the pool, move its tasks to other nodes, and refuse its key from now on.
    Revoke(super::enrollment::VerdictArgs),
}

#[derive(Debug, Args)]
pub struct TasksArgs {
    #[command(flatten)]
    read: ReadArgs,
    /// Only tasks with this status: pending, running, completed, failed.
    #[arg(long)]
    status: Option<String>,
    /// How many of the newest tasks to show.
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LedgerArgs {
    #[command(subcommand)]
    command: Option<LedgerCommand>,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Recompute the hash chain and check that the books balance; exit 1 if not.
    Verify(ReadArgs),
}

fn open(data: &DataDir) -> anyhow::Result<Store> {
    Ok(Store::open_read_only(&data.data_dir.join("ambient.db"))?)
}

pub fn nodes(args: NodesArgs) -> anyhow::Result<ExitCode> {
    use super::enrollment;
    let args = match args.command {
        None => args.read,
        Some(NodesCommand::Enrollment(read)) => return enrollment::list(&read.data, read.json),
        Some(NodesCommand::Approve(v)) => return enrollment::decide(v, true),
        Some(NodesCommand::Revoke(v)) => return enrollment::decide(v, false),
    };
    let store = open(&args.data)?;
    let nodes = store.node_views()?;
    let dropped = store.dropped()?;
    if args.json {
        let out = serde_json::json!({ "nodes": nodes, "dropped": dropped });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let drops: Vec<String> = dropped
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(name, n)| format!("{} {n}", name.replace('_', " ")))
        .collect();
    let footer = || {
        if !drops.is_empty() {
            println!(
                "dropped since the coordinator started: {}",
                drops.join(", ")
            );
        }
    };
    if nodes.is_empty() {
        println!("no nodes registered yet");
        footer();
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<12} {:<17} {:<8} {:<15} {:>7} {:<7} {:>6} {:>5} {:>5} {:>5} {:>5} {:>6} {:>6} {:>4} {:>9}  BREAKER",
        "NODE",
        "PROFILE",
        "ARCH",
        "ENGINE",
        "FUEL/S",
        "ONLINE",
        "SCORE",
        "BW",
        "LAT",
        "CPU",
        "REP",
        "CRED",
        "VERIF",
        "RUN",
        "SEEN"
    );
    // Scores are in 0..=SCORE_SCALE; shown from 0 to 1.
    let unit = |x: u32| format!("{:.2}", f64::from(x) / f64::from(ambient_core::SCORE_SCALE));
    for n in &nodes {
        let terms = &n.terms;
        let seen = n
            .last_seen_ms_ago
            .map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0))
            .unwrap_or_else(|| "never".into());
        let mut breaker = match &n.breaker_reason {
            Some(r) => format!("{:?} ({r})", n.breaker),
            None => format!("{:?}", n.breaker),
        };
        // The device's own breaker (its temperature, throttling or errors by its own limits)
        // takes it out of the pool too.
        if let Some(own) = n
            .sample
            .as_ref()
            .map(|s| s.breaker)
            .filter(|b| *b != BreakerState::Closed)
        {
            breaker.push_str(&format!("; device's own breaker {own:?}"));
        }
        // A node caught with a wrong result gets no work for a while.
        if let Some(ms) = n.blacklisted_for_ms {
            breaker.push_str(&format!(
                "; blacklisted for {:.0} s (a result shown wrong)",
                ms as f64 / 1000.0
            ));
        }
        // Claims the coordinator's own measurements contradict: shown beside the facts.
        for claim in &n.contradicted {
            breaker.push_str(&format!("; {claim}"));
        }
        let node = n.node.to_hex();
        println!(
            "{:<12} {:<17} {:<8} {:<15} {:>7} {:<7} {:>6} {:>5} {:>5} {:>5} {:>5} {:>6} {:>6} {:>4} {:>9}  {}",
            &node.as_str()[..12],
            n.profile.as_deref().unwrap_or("-"),
            n.arch,
            n.engine,
            per_second(n.fuel_per_s),
            if n.online { "yes" } else { "no" },
            unit(terms.score),
            unit(terms.bandwidth),
            unit(terms.latency),
            unit(terms.compute),
            unit(terms.reputation),
            format!(
                "{:.4}",
                f64::from(n.credibility) / f64::from(ambient_core::SCORE_SCALE)
            ),
            n.reputation.verified,
            n.in_flight,
            seen,
            breaker
        );
    }
    footer();
    Ok(ExitCode::SUCCESS)
}

/// A rate with an SI suffix and three significant digits (`1.23G`, `85.0M`), `-` when unknown.
fn per_second(rate: Option<u64>) -> String {
    let rate = match rate {
        None => return "-".to_owned(),
        Some(0) => return "0".to_owned(),
        Some(rate) => rate,
    };
    // Rounded to three significant digits first, so 999,999,999 is `1.00G`, not `1000M`.
    let r = rate as f64;
    let digits = r.log10().floor() as i32 - 2;
    let r = (r / 10f64.powi(digits)).round() * 10f64.powi(digits);
    let (scaled, suffix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(unit, _)| r >= *unit)
        .map_or((r, ""), |(unit, s)| (r / unit, s));
    match scaled {
        s if s >= 100.0 => format!("{s:.0}{suffix}"),
        s if s >= 10.0 => format!("{s:.1}{suffix}"),
        s => format!("{s:.2}{suffix}"),
    }
}

pub fn tasks(args: TasksArgs) -> anyhow::Result<ExitCode> {
    let store = open(&args.read.data)?;
    let status = args
        .status
        .as_deref()
        .map(|s| {
            s.parse::<TaskStatus>().map_err(|_| {
                anyhow::anyhow!("unknown status {s:?}: use pending, running, completed or failed")
            })
        })
        .transpose()?;
    let rows = store.tasks(args.limit, status)?;
    if args.read.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<40} {:<10} {:<12} {:>8}  DETAIL",
        "TASK", "STATUS", "CLIENT", "ATTEMPTS"
    );
    for r in rows {
        let detail = r
            .result_json
            .as_deref()
            .and_then(|j| serde_json::from_str::<TaskEvent>(j).ok())
            .map(|ev| match ev.error {
                Some(e) => e.message,
                None => format!("nodes {} reward {}", ev.nodes.len(), ev.reward.unwrap_or(0)),
            })
            .unwrap_or_default();
        println!(
            "{:<40} {:<10} {:<12} {:>8}  {}",
            r.task_id.as_str(),
            r.status.as_str(),
            r.client,
            r.attempts,
            detail
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn ledger(args: LedgerArgs) -> anyhow::Result<ExitCode> {
    if let Some(LedgerCommand::Verify(read)) = args.command {
        let store = open(&read.data)?;
        let check = store.verify_ledger()?;
        if read.json {
            println!("{}", serde_json::to_string_pretty(&check)?);
        } else if check.is_ok() {
            println!(
                "ledger ok: {} entries, chain head {}, books balance",
                check.entries, check.head
            );
        } else {
            match check.first_bad_entry {
                Some(n) => println!("ledger BROKEN: hash chain fails at entry {n}"),
                None => println!("ledger BROKEN: the books do not balance"),
            }
        }
        return Ok(if check.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let store = open(&args.read.data)?;
    let balances = store.balances()?;
    if args.read.json {
        println!("{}", serde_json::to_string_pretty(&balances)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<42} {:>16} {:>8}",
        "ACCOUNT", "BALANCE (credits)", "ENTRIES"
    );
    for b in balances {
        println!(
            "{:<42} {:>16.6} {:>8}",
            b.account,
            b.balance as f64 / 1e6,
            b.entries
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::per_second;

    #[test]
    fn rates_are_shown_with_three_significant_digits_and_an_si_suffix() {
        assert_eq!(per_second(None), "-");
        assert_eq!(per_second(Some(950)), "950");
        assert_eq!(per_second(Some(1_234_567_890)), "1.23G");
        assert_eq!(per_second(Some(85_000_000)), "85.0M");
        assert_eq!(per_second(Some(312_000)), "312k");
        assert_eq!(
            per_second(Some(999_999_999)),
            "1.00G",
            "rounded before the suffix"
        );
        assert_eq!(per_second(Some(99_960_000)), "100M");
        assert_eq!(per_second(Some(1)), "1.00");
    }
}
