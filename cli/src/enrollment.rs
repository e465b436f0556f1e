//! `ambient nodes enrollment | approve | revoke`: the operator's say over which keys join.
//!
//! The verdicts go into the coordinator's database; a running coordinator applies them within
//! a tick (it watches the file for writes from other processes).

use std::process::ExitCode;

use ambient_coordinator::Now;
use ambient_coordinator::store::{Enrolled, Standing, Store, Subject};
use ambient_core::{Envelope, Message};
use anyhow::anyhow;
use clap::Args;

use super::DataDir;

#[derive(Debug, Args)]
pub struct VerdictArgs {
    #[command(flatten)]
    data: DataDir,
    /// The node's id (32 hex characters, as `ambient nodes enrollment` lists it) or its ed25519
    /// public key (64 hex characters, as `ambient-agent --print-node-id` prints it on the device).
    node: String,
}

/// `ambient nodes enrollment`.
pub fn list(data: &DataDir, json: bool) -> anyhow::Result<ExitCode> {
    let store = Store::open_read_only(&data.data_dir.join("ambient.db"))?;
    let rows = store.enrollment()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!(
            "no keys wait for approval and none was approved or revoked\n(with [enrollment] mode = \"allowlist\", nodes whose key is not listed appear here)"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let now_ms = Now::read().unix_ms;
    println!(
        "{:<32} {:<8} {:<8} {:<17} {:>10}  PUBLIC KEY",
        "NODE", "STATE", "ARCH", "PROFILE", "CHANGED"
    );
    for row in &rows {
        let (arch, profile) = announced(row);
        println!(
            "{:<32} {:<8} {:<8} {:<17} {:>10}  {}",
            row.node.to_hex(),
            row.standing.as_str(),
            arch,
            profile,
            ago(now_ms.saturating_sub(row.changed_ms)),
            hex::encode(row.public_key)
        );
    }
    if rows.iter().any(|r| r.standing == Standing::Pending) {
        println!("\nadmit a pending node with `ambient nodes approve <NODE>`");
    }
    Ok(ExitCode::SUCCESS)
}

/// `ambient nodes approve` (`admit`) or `ambient nodes revoke`.
pub fn decide(args: VerdictArgs, admit: bool) -> anyhow::Result<ExitCode> {
    let subject = Subject::parse(&args.node).ok_or_else(|| {
        anyhow!(
            "{:?} is neither a node id (32 hex characters) nor a public key (64 hex characters)",
            args.node
        )
    })?;
    // The writing open: it must not create a database where the coordinator never ran.
    let path = args.data.data_dir.join("ambient.db");
    Store::open_read_only(&path)?;
    let mut store = Store::open(&path)?;
    let verdict = if admit {
        Standing::Approved
    } else {
        Standing::Revoked
    };
    let row = store.decide(subject, verdict, Now::read().unix_ms)?;
    let node = row.node;
    if admit {
        let joins = if row.announce.is_some() {
            "joins at once"
        } else {
            "joins when its agent next connects"
        };
        println!(
            "approved node {node}\na running coordinator applies it within a second: the node {joins} and gets work after its next telemetry"
        );
    } else {
        println!(
            "revoked node {node}\na running coordinator applies it within a second: the node leaves the pool, its tasks move to other nodes, and its key is refused until `ambient nodes approve {node}`"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The architecture and profile the node announced, if its announce is stored.
fn announced(row: &Enrolled) -> (String, String) {
    let announce = row
        .announce
        .as_deref()
        .and_then(|f| Envelope::decode(f).ok())
        .and_then(|e| match e.message {
            Message::Announce(a) => Some((
                a.announce.arch.as_str().to_owned(),
                a.announce.profile.as_deref().unwrap_or("-").to_owned(),
            )),
            _ => None,
        });
    announce.unwrap_or_else(|| ("-".into(), "-".into()))
}

fn ago(ms: u64) -> String {
    match ms / 1000 {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}
