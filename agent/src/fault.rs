//! Fault injection, for tests of the coordinator's verification with real agents: compiled only
//! with the non-default `fault-injection` feature, so no agent built for a device can lie.
//!
//! `ambient-agent --fault wrong-output:0.1 --fault claim-perfect-health` makes this agent:
//!
//! - `wrong-output:P`: return, on a share P (0 to 1) of its runs, its output followed by its
//!   node id, with a receipt it signs over that output: wrong, and different from any other
//!   lying agent's, so two liars never agree (they lie independently; they do not collude).
//!   Which runs lie is decided by the task id and attempt, so a rerun of the same attempt lies
//!   again.
//! - `claim-perfect-health`: report 1 Gbit/s, 0.1 ms round trips, an idle CPU, 40 °C and
//!   plenty of free memory, whatever it measures.

use std::str::FromStr;

use ambient_core::{NodeId, TaskId, TelemetrySample, sha3_256};

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A wrong output on this many of every 1,000 runs.
    WrongOutput {
        /// Runs in 1,000 that lie.
        permille: u16,
    },
    /// Telemetry that claims a perfect device.
    ClaimPerfectHealth,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "claim-perfect-health" => Ok(Self::ClaimPerfectHealth),
            Some(("wrong-output", share)) => match share.parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => Ok(Self::WrongOutput {
                    permille: (p * 1000.0).round() as u16,
                }),
                _ => Err(format!(
                    "wrong-output takes a share from 0 to 1 (wrong-output:0.1), not {share:?}"
                )),
            },
            _ => Err(format!(
                "unknown fault {s:?}: use wrong-output:SHARE or claim-perfect-health"
            )),
        }
    }
}

/// The faults an agent injects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults(pub Vec<Fault>);

impl Faults {
    /// Changes `output` when this run of `node`'s is one that lies.
    pub fn corrupt(&self, node: &NodeId, task_id: &TaskId, attempt: u16, output: &mut Vec<u8>) {
        let Some(permille) = self.0.iter().find_map(|f| match f {
            Fault::WrongOutput { permille } => Some(*permille),
            Fault::ClaimPerfectHealth => None,
        }) else {
            return;
        };
        let key = [task_id.as_str().as_bytes(), &attempt.to_le_bytes()].concat();
        let h = sha3_256(&key);
        if u16::from_le_bytes([h.0[0], h.0[1]]) % 1000 >= permille {
            return;
        }
        output.extend_from_slice(&node.0);
    }

    /// Overwrites `sample` with a perfect device's readings when claiming perfect health.
    pub fn boast(&self, sample: &mut TelemetrySample) {
        if self.0.contains(&Fault::ClaimPerfectHealth) {
            sample.bandwidth_kbps = Some(1_000_000);
            sample.latency_us = Some(100);
            sample.cpu_load_permille = Some(0);
            sample.temp_millic = Some(40_000);
            sample.mem_free_bytes = Some(64 << 30);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_bad_ones_name_what_is_accepted() {
        assert_eq!(
            "wrong-output:0.1".parse(),
            Ok(Fault::WrongOutput { permille: 100 })
        );
        assert_eq!(
            "claim-perfect-health".parse(),
            Ok(Fault::ClaimPerfectHealth)
        );
        assert!(
            "wrong-output:2"
                .parse::<Fault>()
                .unwrap_err()
                .contains("0 to 1")
        );
        assert!(
            "lie"
                .parse::<Fault>()
                .unwrap_err()
                .contains("wrong-output:SHARE")
        );
    }

    #[test]
    fn a_tenth_of_runs_lie_and_the_same_attempt_lies_the_same_way() {
        let faults = Faults(vec![Fault::WrongOutput { permille: 100 }]);
        let lied = (0..10_000)
            .filter(|i| {
                let id = TaskId::new(&format!("t{i}")).unwrap();
                let node = NodeId([7; 16]);
                let mut out = b"right".to_vec();
                faults.corrupt(&node, &id, 1, &mut out);
                let mut again = b"right".to_vec();
                faults.corrupt(&node, &id, 1, &mut again);
                assert_eq!(out, again);
                out != b"right"
            })
            .count();
        assert!((800..1200).contains(&lied), "{lied} of 10000");
    }
}
