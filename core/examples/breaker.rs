//! A Raspberry Pi heats up under load, its breaker takes it out of the pool, and after a
//! cool-down a single probe task brings it back. Time is simulated: the breaker never reads
//! a clock, the caller passes `now` in.
//!
//! ```sh
//! cargo run -p ambient-core --example breaker
//! ```

use ambient_core::{Admission, Breaker, SafetyPolicy, TelemetrySample};

fn main() {
    // The Pi firmware throttles from 80 °C, so this policy trips there and resumes at 75 °C.
    let mut breaker = Breaker::new(SafetyPolicy::raspberry_pi());
    let temps_c = [62, 71, 78, 81, 83, 79, 76, 74, 70, 68];

    for (i, temp_c) in temps_c.into_iter().enumerate() {
        let now_ms = i as u64 * 10_000; // one sample every 10 s
        let sample = TelemetrySample {
            temp_millic: Some(temp_c * 1_000),
            latency_us: Some(8_000),
            ..TelemetrySample::default()
        };
        if let Some(t) = breaker.observe(now_ms, &sample) {
            let why = t.reason.map(|r| format!(": {r}")).unwrap_or_default();
            println!(
                "{:>4} s  {temp_c} °C  {:?} -> {:?}{why}",
                now_ms / 1000,
                t.from,
                t.to
            );
        }
        match breaker.admit(now_ms) {
            Admission::Admit => println!("{:>4} s  {temp_c} °C  takes tasks", now_ms / 1000),
            Admission::Probe => {
                println!("{:>4} s  {temp_c} °C  runs one probe task", now_ms / 1000);
                // The probe succeeded: the breaker closes and the node is back in the pool.
                if let Some(t) = breaker.record(now_ms + 500, true) {
                    println!(
                        "{:>4} s  probe ok  {:?} -> {:?}",
                        now_ms / 1000,
                        t.from,
                        t.to
                    );
                }
            }
            Admission::Refuse(reason) => {
                println!("{:>4} s  {temp_c} °C  refuses: {reason}", now_ms / 1000)
            }
        }
    }
}
