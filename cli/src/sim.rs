//! `ambient sim`: runs `ambient_coordinator::sim` and prints its report as tables or JSON.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use ambient_coordinator::sim::{self, SimConfig, SimReport};
use ambient_coordinator::{DispatchConfig, Policy, RegistryConfig};
use clap::Args as ClapArgs;

/// Flags of `ambient sim`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:\n  \
    ambient sim --liars 0.1                       # 10% of 1,000 nodes lie on 10% of their tasks\n  \
    ambient sim --colluders 0.2 --baseline        # colluders, and the same pool under replicate:2\n  \
    ambient sim --patient 0.1 --patience 100 --lie-rate 1\n  \
    ambient sim --nodes 100 --tasks 5000 --liars 0.3 --json\n\n\
    The dispatcher and registry are the coordinator's own code; only the nodes are simulated.\n\
    The same flags always give the same figures.")]
pub struct SimArgs {
    /// Nodes in the pool.
    #[arg(long, default_value_t = 1_000)]
    pub nodes: u32,
    /// Tasks submitted (one per node stays in flight).
    #[arg(long, default_value_t = 100_000)]
    pub tasks: u64,
    /// Seed of keys, run times, lies and spot-check draws.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Every task's policy: `receipt` (one run, checked while nodes prove themselves and then
    /// at --spot-check-permille), `replicate:K`, or `target:E` (replicas until the chance of a
    /// wrong result is at most E, from the agreeing nodes' histories) [default: the
    /// coordinator's default, target:1e-4].
    #[arg(long, default_value_t = DispatchConfig::default().default_policy, hide_default_value = true)]
    pub verify: Policy,
    /// Share of nodes that lie at random, each with its own wrong output.
    #[arg(long, default_value_t = 0.0)]
    pub liars: f64,
    /// Share of nodes that collude: they lie on the same tasks with the same wrong output.
    #[arg(long, default_value_t = 0.0)]
    pub colluders: f64,
    /// Share of nodes that answer honestly for --patience runs, then lie.
    #[arg(long, default_value_t = 0.0)]
    pub patient: f64,
    /// Share of its tasks on which a cheating node lies.
    #[arg(long, default_value_t = 0.1)]
    pub lie_rate: f64,
    /// Honest runs of a patient cheater before it starts lying.
    #[arg(long, default_value_t = 50)]
    pub patience: u32,
    /// Share of `receipt` tasks spot-checked, in permille ([verification] spot_check_permille).
    #[arg(long, default_value_t = DispatchConfig::default().spot_check_permille)]
    pub spot_check_permille: u16,
    /// Agreements in a row before a node runs unchecked ([verification] trust_after).
    #[arg(long, default_value_t = RegistryConfig::default().trust_after)]
    pub trust_after: u32,
    /// Seconds a node shown wrong gets no work ([verification] blacklist_secs).
    #[arg(long, default_value_t = RegistryConfig::default().blacklist.as_secs())]
    pub blacklist_secs: u64,
    /// Also run the same pool under `replicate:2` (BOINC-style quorum of two) for comparison.
    #[arg(long)]
    pub baseline: bool,
    /// Print the reports as a JSON array instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Runs the simulation(s) and prints the report(s).
pub fn run(a: SimArgs) -> anyhow::Result<ExitCode> {
    let config = SimConfig {
        nodes: a.nodes,
        tasks: a.tasks,
        seed: a.seed,
        verify: a.verify,
        liars: a.liars,
        colluders: a.colluders,
        patient: a.patient,
        lie_rate: a.lie_rate,
        patience: a.patience,
        spot_check_permille: a.spot_check_permille,
        trust_after: a.trust_after,
        blacklist: Duration::from_secs(a.blacklist_secs),
    };
    let mut configs = vec![config.clone()];
    if a.baseline && config.verify != Policy::Replicate(2) {
        configs.push(SimConfig {
            verify: Policy::Replicate(2),
            ..config
        });
    }
    let mut reports = Vec::new();
    for c in &configs {
        let started = Instant::now();
        // The registry's warnings ("node blacklisted") are about simulated nodes: not logged.
        let quiet = tracing::subscriber::NoSubscriber::default();
        let report = tracing::subscriber::with_default(quiet, || sim::run(c))?;
        if !a.json {
            eprintln!(
                "simulated {} with {} in {:.1} s",
                report.tasks,
                report.verify,
                started.elapsed().as_secs_f64()
            );
        }
        reports.push(report);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", tables(&configs[0], &reports));
    }
    Ok(ExitCode::SUCCESS)
}

/// The human report: the pool, one row per policy, then one table per policy by behaviour.
fn tables(c: &SimConfig, reports: &[SimReport]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let first = &reports[0];
    let pool: Vec<String> = first
        .groups
        .iter()
        .map(|g| format!("{} {}", g.nodes, g.behaviour.as_str()))
        .collect();
    let _ = writeln!(
        s,
        "{} nodes ({}), {} tasks, seed {}, lie rate {}, spot checks {}‰, trusted after {} agreements\n",
        c.nodes,
        pool.join(", "),
        c.tasks,
        c.seed,
        c.lie_rate,
        c.spot_check_permille,
        c.trust_after
    );
    let _ = writeln!(
        s,
        "{:<12} {:>10} {:>7} {:>15} {:>9} {:>10} {:>19} {:>10}",
        "POLICY",
        "COMPLETED",
        "FAILED",
        "WRONG ACCEPTED",
        "RATE",
        "RUNS/TASK",
        "HONEST BLACKLISTED",
        "SIM TIME"
    );
    for r in reports {
        let _ = writeln!(
            s,
            "{:<12} {:>10} {:>7} {:>15} {:>9.1e} {:>10.3} {:>19} {:>8.0} s",
            r.verify,
            r.completed,
            r.failed,
            r.wrong_accepted,
            r.wrong_accepted_rate,
            r.executions_per_task,
            r.honest_blacklisted,
            r.simulated_s
        );
    }
    for r in reports {
        let _ = writeln!(
            s,
            "\n{}: by behaviour\n{:<10} {:>6} {:>9} {:>8} {:>15} {:>8} {:>26}",
            r.verify,
            "BEHAVIOUR",
            "NODES",
            "RUNS",
            "LIES",
            "WRONG ACCEPTED",
            "CAUGHT",
            "LIES BEFORE CAUGHT p50/max"
        );
        for g in &r.groups {
            let before = match (g.lies_before_caught_p50, g.lies_before_caught_max) {
                (Some(p), Some(m)) => format!("{p}/{m}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "{:<10} {:>6} {:>9} {:>8} {:>15} {:>8} {:>26}",
                g.behaviour.as_str(),
                g.nodes,
                g.executions,
                g.lies,
                g.wrong_accepted,
                g.caught,
                before
            );
        }
    }
    s
}
