//! Simulated device profiles: plausible readings for boards that are not the machine we run on.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use ambient_core::SafetyPolicy;

/// A device the agent can pretend to be (`--simulate PROFILE`).
///
/// Simulation replaces the machine's readings (cores, memory, CPU load, temperature) with
/// synthetic ones typical of the board, with small deterministic jitter, and adds the board's
/// nominal network latency on top of the latency actually measured. Every sample says
/// `simulated: true`, and the announce names the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Profile {
    /// Raspberry Pi 4 Model B, 4 GiB, Gigabit Ethernet.
    Pi4,
    /// Raspberry Pi 5, 8 GiB, Gigabit Ethernet.
    Pi5,
    /// Raspberry Pi Zero 2 W, 512 MiB, 2.4 GHz Wi-Fi.
    PiZero2W,
    /// NVIDIA Jetson Orin Nano developer kit, 8 GiB.
    JetsonOrinNano,
    /// StarFive VisionFive 2 (RISC-V), 8 GiB.
    VisionFive2,
}

/// Heat a simulated device reports on top of what its profile and load give, changeable while
/// the agent runs: `ambient demo --dashboard` turns it up on one node to show a node
/// overheating, and its breakers opening with the reason. Clones share one value; it starts
/// at 0 and real readings ignore it.
#[derive(Debug, Clone, Default)]
pub struct Heater(Arc<AtomicI32>);

impl Heater {
    /// Sets the extra heat, in millidegrees Celsius.
    pub fn set_millic(&self, extra: i32) {
        self.0.store(extra, Ordering::Relaxed);
    }

    /// The extra heat, in millidegrees Celsius.
    pub fn millic(&self) -> i32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Two configs are equal when they share one heater.
impl PartialEq for Heater {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The numbers a simulated board is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SimSpec {
    pub cores: u16,
    pub mem_total_bytes: u64,
    /// Idle CPU load, in permille.
    pub idle_load_permille: u16,
    /// Idle temperature, in millidegrees Celsius.
    pub idle_temp_millic: i32,
    /// Extra temperature at full load, in millidegrees Celsius.
    pub load_temp_millic: i32,
    /// Latency of the board's link, added to the measured one, in microseconds.
    pub link_latency_us: u32,
    /// Nominal link bandwidth, an upper bound on the measured one, in kbit/s.
    pub link_kbps: u32,
    /// Memory the OS and services take, in bytes.
    pub os_bytes: u64,
}

impl Profile {
    /// Every profile, in the order `--help` lists them.
    pub const ALL: [Profile; 5] = [
        Self::Pi4,
        Self::Pi5,
        Self::PiZero2W,
        Self::JetsonOrinNano,
        Self::VisionFive2,
    ];

    /// The profile's name, as given to `--simulate`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pi4 => "pi4",
            Self::Pi5 => "pi5",
            Self::PiZero2W => "pi-zero-2w",
            Self::JetsonOrinNano => "jetson-orin-nano",
            Self::VisionFive2 => "visionfive2",
        }
    }

    /// The safety policy the board needs: the Pi firmware throttles from 80 °C.
    pub fn safety_policy(self) -> SafetyPolicy {
        match self {
            Self::Pi4 | Self::Pi5 | Self::PiZero2W => SafetyPolicy::raspberry_pi(),
            Self::JetsonOrinNano | Self::VisionFive2 => SafetyPolicy::default(),
        }
    }

    pub(crate) fn spec(self) -> SimSpec {
        const GIB: u64 = 1 << 30;
        match self {
            Self::Pi4 => SimSpec {
                cores: 4,
                mem_total_bytes: 4 * GIB,
                idle_load_permille: 60,
                idle_temp_millic: 48_000,
                load_temp_millic: 22_000,
                link_latency_us: 1_500,
                link_kbps: 940_000,
                os_bytes: 600 << 20,
            },
            Self::Pi5 => SimSpec {
                cores: 4,
                mem_total_bytes: 8 * GIB,
                idle_load_permille: 40,
                idle_temp_millic: 45_000,
                load_temp_millic: 25_000,
                link_latency_us: 1_000,
                link_kbps: 940_000,
                os_bytes: 700 << 20,
            },
            Self::PiZero2W => SimSpec {
                cores: 4,
                mem_total_bytes: 512 << 20,
                idle_load_permille: 120,
                idle_temp_millic: 42_000,
                load_temp_millic: 20_000,
                link_latency_us: 6_000,
                link_kbps: 40_000,
                os_bytes: 180 << 20,
            },
            Self::JetsonOrinNano => SimSpec {
                cores: 6,
                mem_total_bytes: 8 * GIB,
                idle_load_permille: 50,
                idle_temp_millic: 40_000,
                load_temp_millic: 18_000,
                link_latency_us: 800,
                link_kbps: 940_000,
                os_bytes: 1_500 << 20,
            },
            Self::VisionFive2 => SimSpec {
                cores: 4,
                mem_total_bytes: 8 * GIB,
                idle_load_permille: 80,
                idle_temp_millic: 50_000,
                load_temp_millic: 15_000,
                link_latency_us: 2_500,
                link_kbps: 940_000,
                os_bytes: 500 << 20,
            },
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--simulate` value that names no profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown device profile `{0}`; expected one of pi4, pi5, pi-zero-2w, jetson-orin-nano, visionfive2"
)]
pub struct UnknownProfile(pub String);

impl FromStr for Profile {
    type Err = UnknownProfile;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownProfile(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_parses_from_its_own_name() {
        for p in Profile::ALL {
            assert_eq!(p.as_str().parse::<Profile>(), Ok(p));
        }
        assert!(
            "pi3"
                .parse::<Profile>()
                .unwrap_err()
                .to_string()
                .contains("pi-zero-2w")
        );
    }

    #[test]
    fn pi_profiles_trip_at_80c_and_others_at_85c() {
        assert_eq!(Profile::Pi4.safety_policy().max_temp_millic, 80_000);
        assert_eq!(Profile::VisionFive2.safety_policy().max_temp_millic, 85_000);
    }
}
