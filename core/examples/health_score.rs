//! Scores three devices with the seed formula `0.4·bandwidth + 0.3·latency + 0.2·compute +
//! 0.1·reputation`, in integer fixed point (10,000 = 1.0), so every architecture computes the
//! same numbers and the coordinator's ranking never depends on where it runs.
//!
//! ```sh
//! cargo run -p ambient-core --example health_score
//! ```

use ambient_core::{Reputation, ScoreConfig, TelemetrySample, health_score};

fn main() {
    // Reputation weighs 0.1: three disputes cost the Jetson a third of its reputation term but
    // only ~3% of its score, so disputes reorder similar nodes; replication and spot checks,
    // not the score, are what keep wrong results out.
    let config = ScoreConfig::default(); // saturates at 100 Mbit/s and 8 cores; 0 at 100 ms
    let devices = [
        // name, bandwidth kbit/s, latency µs, load ‰, cores, verified, disputed
        ("pi5-wired", 940_000, 1_200, 150, 4, 120, 0),
        ("pi-zero-wifi", 18_000, 35_000, 400, 1, 40, 0),
        ("jetson-disputed", 500_000, 3_000, 50, 6, 60, 3),
    ];
    println!(
        "{:<15} {:>9} {:>8} {:>8} {:>10} {:>6}",
        "node", "bandwidth", "latency", "compute", "reputation", "score"
    );
    for (name, bw, lat, load, cores, verified, disputed) in devices {
        let sample = TelemetrySample {
            bandwidth_kbps: Some(bw),
            latency_us: Some(lat),
            cpu_load_permille: Some(load),
            ..TelemetrySample::default()
        };
        let reputation = Reputation {
            verified,
            disputed,
            ..Reputation::default()
        }
        .score();
        let t = health_score(&config, &sample, cores, reputation);
        println!(
            "{name:<15} {:>9} {:>8} {:>8} {:>10} {:>6}",
            t.bandwidth, t.latency, t.compute, t.reputation, t.score
        );
    }
}
