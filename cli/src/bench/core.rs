//! Core (section 4): ambient-core's hot functions (health score, breaker, receipt commitment, sign,
//! verify) and sha3-256, beside a timing-loop floor, plain sha3 and `openssl speed`.

use std::hint::black_box;
use std::process::Stdio;

use ambient_core::{
    Breaker, Engine, Exit, Identity, Limits, Receipt, SafetyPolicy, ScoreConfig, TaskId,
    TelemetrySample, health_score, sha3_256,
};
use anyhow::Context as _;

use super::Plan;
use super::harness::{Timing, find_on_path, progress, time_calls};
use super::report::{Figure, Goal};

pub(super) const CORE: &str = "4. core";

/// A receipt as an agent signs one, and its signer.
pub(super) fn bench_receipt() -> anyhow::Result<(Identity, Receipt)> {
    let identity = Identity::from_secret(&[0x42; 32]);
    let receipt = Receipt {
        task_id: TaskId::new("bench-task-000001").context("the bench task id is invalid")?,
        attempt: 1,
        node: identity.node_id(),
        module: sha3_256(b"module"),
        input: sha3_256(b"input"),
        output: sha3_256(b"output"),
        fuel_used: 12_345_678,
        limits: Limits::default(),
        engine: Engine::Wasmtime,
        exit: Exit::Ok,
    };
    Ok((identity, receipt))
}

/// Times signing `receipt` (commitment + ed25519) and verifying the signed copy.
pub(super) fn sign_and_verify(
    plan: &Plan,
    identity: &Identity,
    receipt: &Receipt,
) -> anyhow::Result<(Timing, Timing)> {
    let public_key = identity.public_key();
    let sign = time_calls(plan, || black_box(receipt).clone().sign(identity));
    let signed = receipt.clone().sign(identity);
    signed.verify_signature(&public_key)?;
    let verify = time_calls(plan, || black_box(&signed).verify_signature(&public_key));
    Ok((sign, verify))
}

/// What `openssl speed` measured, or why it could not.
struct OpenSsl {
    sha3_bytes_per_s: Result<f64, String>,
    ed25519_per_s: Result<(f64, f64), String>,
}

/// Runs `openssl speed -elapsed -mr` with `args` and returns its machine-readable output.
fn openssl_speed(args: &[&str]) -> Result<String, String> {
    let Some(exe) = find_on_path("openssl") else {
        return Err("openssl is not installed, so there is no baseline".into());
    };
    let out = std::process::Command::new(exe)
        .arg("speed")
        // Wall-clock time, as every figure of ours is: by default openssl divides by its CPU
        // time, which a busy machine does not inflate, and the ratio would tilt against us.
        .arg("-elapsed")
        .arg("-mr")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl speed {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The fields of the first `+F...` line of `openssl speed -mr` output that mentions `algorithm`.
fn openssl_fields<'a>(output: &'a str, algorithm: &str) -> Option<Vec<&'a str>> {
    output
        .lines()
        .find(|l| l.starts_with("+F") && l.split(':').any(|f| f.eq_ignore_ascii_case(algorithm)))
        .map(|l| l.split(':').collect())
}

fn run_openssl(plan: &Plan) -> OpenSsl {
    let seconds = plan.openssl_seconds.to_string();
    // `+F:<n>:sha3-256:<bytes per second>`
    let sha3_bytes_per_s = openssl_speed(&[
        "-seconds", &seconds, "-bytes", "1048576", "-evp", "sha3-256",
    ])
    .and_then(|out| {
        openssl_fields(&out, "sha3-256")
            .and_then(|f| f.last()?.trim().parse().ok())
            .ok_or_else(|| format!("cannot read openssl's sha3-256 result from: {}", out.trim()))
    });
    // `+F6:<n>:<bits>:Ed25519:<signs per second>:<verifies per second>`
    let ed25519_per_s = openssl_speed(&["-seconds", &seconds, "ed25519"]).and_then(|out| {
        openssl_fields(&out, "Ed25519")
            .and_then(|f| {
                Some((
                    f.get(4)?.trim().parse().ok()?,
                    f.get(5)?.trim().parse().ok()?,
                ))
            })
            .ok_or_else(|| format!("cannot read openssl's Ed25519 result from: {}", out.trim()))
    });
    OpenSsl {
        sha3_bytes_per_s,
        ed25519_per_s,
    }
}

pub(super) fn section_core(plan: Plan) -> anyhow::Result<Vec<Figure>> {
    progress("4. core");
    let mut figures = Vec::new();
    let sample = TelemetrySample {
        bandwidth_kbps: Some(50_000),
        latency_us: Some(20_000),
        cpu_load_permille: Some(250),
        mem_free_bytes: Some(2 << 30),
        temp_millic: Some(55_000),
        ..TelemetrySample::default()
    };
    let mut counter = 0u64;
    let floor = time_calls(&plan, || {
        counter += 1;
        counter
    });
    let floor_what = "timing-loop floor (a counter increment)";

    let config = ScoreConfig::default();
    let t = time_calls(&plan, || {
        health_score(
            black_box(&config),
            black_box(&sample),
            black_box(4),
            black_box(9_000),
        )
    });
    figures.push(
        Figure::new(
            CORE,
            "core.health_score_ns",
            "health_score",
            t.median_ns,
            "ns",
        )
        .against(floor.median_ns, floor_what),
    );

    let mut breaker = Breaker::new(SafetyPolicy::default());
    let mut now_ms = 0u64;
    let t = time_calls(&plan, || {
        now_ms += 1;
        let transition = breaker.observe(now_ms, black_box(&sample));
        (transition, breaker.admit(now_ms))
    });
    figures.push(
        Figure::new(
            CORE,
            "core.breaker_step_ns",
            "breaker observe + admit",
            t.median_ns,
            "ns",
        )
        .against(floor.median_ns, floor_what),
    );

    let (identity, receipt) = bench_receipt()?;
    let t = time_calls(&plan, || black_box(&receipt).commitment());
    // Tag and encoding of this receipt are ~170 bytes: two Keccak-f blocks, as are 200 bytes.
    let block = [0x33u8; 200];
    let hash_floor = time_calls(&plan, || sha3_256(black_box(&block)));
    figures.push(
        Figure::new(
            CORE,
            "core.receipt_commitment_ns",
            "receipt commitment",
            t.median_ns,
            "ns",
        )
        .against(
            hash_floor.median_ns,
            "sha3-256 of 200 bytes (same 2 Keccak-f blocks)",
        ),
    );

    progress("4. core: openssl speed");
    let openssl = run_openssl(&plan);
    let (sign, verify) = sign_and_verify(&plan, &identity, &receipt)?;
    let mut sign_figure = Figure::new(
        CORE,
        "core.receipt_sign_ns",
        "receipt sign (commitment + ed25519)",
        sign.median_ns,
        "ns",
    );
    let mut verify_figure = Figure::new(
        CORE,
        "core.receipt_verify_ns",
        "receipt verify (commitment + ed25519)",
        verify.median_ns,
        "ns",
    );
    match &openssl.ed25519_per_s {
        Ok((signs, verifies)) => {
            sign_figure = sign_figure.against(1e9 / signs, "openssl speed -elapsed ed25519, sign");
            verify_figure =
                verify_figure.against(1e9 / verifies, "openssl speed -elapsed ed25519, verify");
        }
        Err(why) => {
            sign_figure = sign_figure.note(why.clone());
            verify_figure = verify_figure.note(why.clone());
        }
    }
    figures.push(sign_figure);
    figures.push(verify_figure);

    let buffer = vec![0xa5u8; 1 << 20];
    let t = time_calls(&plan, || sha3_256(black_box(&buffer)));
    let mib_per_s = 1e9 / t.median_ns;
    let sha3 = Figure::new(
        CORE,
        "core.sha3_256_mib_per_s",
        "sha3-256, 1 MiB buffers",
        mib_per_s,
        "MiB/s",
    );
    figures.push(match &openssl.sha3_bytes_per_s {
        Ok(bytes) => sha3
            .against(
                bytes / f64::from(1u32 << 20),
                "openssl speed -elapsed -evp sha3-256 -bytes 1048576",
            )
            .goal(Goal::RatioAtLeast(0.8)),
        Err(why) => sha3.note(why.clone()),
    });
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openssl_machine_readable_lines_parse() {
        let sha3 = "+DT:sha3-256:1:1048576\n+R:467:sha3-256:0.980000\n+H:1048576\n+F:25:sha3-256:499678563.27\n";
        assert_eq!(
            openssl_fields(sha3, "sha3-256").and_then(|f| f.last()?.parse::<f64>().ok()),
            Some(499_678_563.27)
        );
        let ed = "+DTP:253:sign:Ed25519:1\n+F6:0:253:Ed25519:25087.500000:9727.272727\n";
        let f = openssl_fields(ed, "Ed25519").unwrap_or_default();
        assert_eq!(f.get(4).and_then(|v| v.parse::<f64>().ok()), Some(25_087.5));
        assert_eq!(
            f.get(5).and_then(|v| v.parse::<f64>().ok()),
            Some(9_727.272727)
        );
    }
}
