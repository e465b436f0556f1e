//! `ambient passwd`: the hash of a client account's password, for `[broker.users]`.

use std::io::BufRead as _;
use std::process::ExitCode;

use ambient_coordinator::access::{hash_password, is_valid_user_name};
use anyhow::bail;
use clap::Args as ClapArgs;

/// Hash a password for a client account of the embedded broker.
#[derive(Debug, ClapArgs)]
#[command(
    after_help = "Reads the password from the first line of standard input and prints the line to add under\n[broker.users] in coordinator.toml. The client then puts the account in its broker URL:\n\n  echo 'correct horse' | ambient passwd laptop\n  laptop = \"$argon2id$v=19$m=19456,t=2,p=1$...\"\n  ambient submit --broker 'mqtt://laptop:correct%20horse@gateway.local' ..."
)]
pub struct PasswdArgs {
    /// The account's name (not `coordinator`, not a node id).
    name: String,
}

pub fn run(args: PasswdArgs) -> anyhow::Result<ExitCode> {
    if !is_valid_user_name(&args.name) {
        bail!(
            "{:?} cannot be an account: use 1 to 64 visible characters, not `coordinator` or a node id",
            args.name
        );
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        bail!("no password on standard input");
    }
    println!("{} = \"{}\"", args.name, hash_password(password));
    Ok(ExitCode::SUCCESS)
}
