//! Readings of the machine (or of a simulated board): CPU load, free memory, temperature,
//! firmware throttling. A reading the machine cannot give is `None`, never invented.

use std::path::{Path, PathBuf};
use std::process::Command;

use ambient_core::{ThrottleFlags, sha3_256};

use crate::profile::{Profile, SimSpec};

/// One reading of the host; link quality and the breaker are added by the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Reading {
    pub cpu_load_permille: Option<u16>,
    pub mem_free_bytes: Option<u64>,
    pub temp_millic: Option<i32>,
    pub throttle: ThrottleFlags,
}

/// Where readings come from.
pub(crate) enum Sampler {
    Real(Box<RealSampler>),
    Simulated(SimSampler),
}

impl Sampler {
    pub fn new(simulate: Option<Profile>) -> Self {
        match simulate {
            Some(p) => Self::Simulated(SimSampler::new(p)),
            None => Self::Real(Box::new(RealSampler::new())),
        }
    }

    /// Logical cores, as announced.
    pub fn cores(&self) -> u16 {
        match self {
            Self::Real(r) => r.cores,
            Self::Simulated(s) => s.spec.cores,
        }
    }

    /// Total memory in bytes, as announced (0 if the machine does not say).
    pub fn mem_total_bytes(&self) -> u64 {
        match self {
            Self::Real(r) => r.mem_total,
            Self::Simulated(s) => s.spec.mem_total_bytes,
        }
    }

    /// Takes a reading; `tasks_running` shapes simulated load. Blocks briefly (reads /proc,
    /// /sys, may run `vcgencmd`): call it from a blocking thread.
    pub fn sample(&mut self, tasks_running: u16) -> Reading {
        match self {
            Self::Real(r) => r.sample(),
            Self::Simulated(s) => s.sample(tasks_running),
        }
    }

    /// The simulated board's link, added to measured latency and bounding bandwidth.
    pub fn link(&self) -> Option<(u32, u32)> {
        match self {
            Self::Real(_) => None,
            Self::Simulated(s) => Some((s.spec.link_latency_us, s.spec.link_kbps)),
        }
    }
}

/// The real machine, through sysinfo, `/sys/class/thermal` and `vcgencmd`.
pub(crate) struct RealSampler {
    system: Option<sysinfo::System>,
    cores: u16,
    mem_total: u64,
    thermal_root: PathBuf,
    vcgencmd: Option<PathBuf>,
}

impl RealSampler {
    fn new() -> Self {
        let mut system = sysinfo::System::new().ok();
        if let Some(s) = system.as_mut() {
            // CPU usage is a difference between two refreshes: take the first one now.
            s.refresh_cpu_usage();
            s.refresh_memory();
        }
        let cores = std::thread::available_parallelism()
            .map_or(1, |n| n.get().min(u16::MAX as usize) as u16);
        let mem_total = system.as_ref().map_or(0, sysinfo::System::total_memory);
        Self {
            system,
            cores,
            mem_total,
            thermal_root: PathBuf::from("/sys/class/thermal"),
            vcgencmd: find_in_path("vcgencmd"),
        }
    }

    fn sample(&mut self) -> Reading {
        let (cpu, mem) = match self.system.as_mut() {
            Some(s) => {
                s.refresh_cpu_usage();
                s.refresh_memory();
                let usage = s.global_cpu_usage();
                let cpu = usage
                    .is_finite()
                    .then(|| (usage * 10.0).round().clamp(0.0, 1000.0) as u16);
                let mem = (s.total_memory() > 0).then(|| s.available_memory());
                (cpu, mem)
            }
            None => (None, None),
        };
        Reading {
            cpu_load_permille: cpu,
            mem_free_bytes: mem,
            temp_millic: hottest_zone(&self.thermal_root),
            throttle: self
                .vcgencmd
                .as_deref()
                .and_then(pi_throttle)
                .unwrap_or_default(),
        }
    }
}

/// The hottest of `<root>/thermal_zone*/temp`, in millidegrees; `None` without any zone.
pub(crate) fn hottest_zone(root: &Path) -> Option<i32> {
    let entries = std::fs::read_dir(root).ok()?;
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("temp")).ok())
        .filter_map(|s| s.trim().parse::<i32>().ok())
        .max()
}

/// Runs `vcgencmd get_throttled` and maps the answer (`throttled=0x50005`) to flags.
fn pi_throttle(vcgencmd: &Path) -> Option<ThrottleFlags> {
    let out = Command::new(vcgencmd).arg("get_throttled").output().ok()?;
    if !out.status.success() {
        return None;
    }
    parse_throttled(&String::from_utf8_lossy(&out.stdout))
}

pub(crate) fn parse_throttled(text: &str) -> Option<ThrottleFlags> {
    let hex = text
        .trim()
        .strip_prefix("throttled=")?
        .trim_start_matches("0x");
    u32::from_str_radix(hex, 16)
        .ok()
        .map(ThrottleFlags::from_pi_firmware)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Whether the device tree names a Raspberry Pi.
pub(crate) fn is_raspberry_pi() -> bool {
    std::fs::read("/proc/device-tree/model")
        .map(|m| String::from_utf8_lossy(&m).contains("Raspberry Pi"))
        .unwrap_or(false)
}

/// A simulated board: load follows the tasks running, temperature follows load, and each
/// reading carries a small jitter derived from the sample number, so runs are reproducible.
pub(crate) struct SimSampler {
    profile: Profile,
    spec: SimSpec,
    n: u64,
}

impl SimSampler {
    fn new(profile: Profile) -> Self {
        Self {
            profile,
            spec: profile.spec(),
            n: 0,
        }
    }

    /// A value in `-amplitude..=amplitude` fixed by the profile, the sample number and `salt`.
    fn jitter(&self, salt: u8, amplitude: i64) -> i64 {
        let mut material = [0u8; 10];
        material[..8].copy_from_slice(&self.n.to_le_bytes());
        material[8] = salt;
        material[9] = self.profile as u8;
        let d = sha3_256(&material).0;
        let r = i64::from(u16::from_le_bytes([d[0], d[1]]));
        r * (2 * amplitude + 1) / 65_536 - amplitude
    }

    fn sample(&mut self, tasks_running: u16) -> Reading {
        self.n += 1;
        let s = self.spec;
        let busy = u64::from(tasks_running.min(s.cores)) * 900 / u64::from(s.cores.max(1));
        let load =
            (i64::from(s.idle_load_permille) + busy as i64 + self.jitter(1, 25)).clamp(0, 1000);
        let temp = i64::from(s.idle_temp_millic)
            + i64::from(s.load_temp_millic) * load / 1000
            + self.jitter(2, 600);
        let used =
            s.os_bytes as i64 + i64::from(tasks_running) * (48 << 20) + self.jitter(3, 8 << 20);
        let free = (s.mem_total_bytes as i64 - used).max(0);
        Reading {
            cpu_load_permille: Some(load as u16),
            mem_free_bytes: Some(free as u64),
            temp_millic: Some(temp as i32),
            throttle: ThrottleFlags::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hottest_thermal_zone_wins_and_no_zone_means_no_reading() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(hottest_zone(dir.path()), None);
        for (zone, temp) in [
            ("thermal_zone0", "41000\n"),
            ("thermal_zone1", "63500\n"),
            ("cooling_device0", "99"),
        ] {
            std::fs::create_dir(dir.path().join(zone)).unwrap();
            std::fs::write(dir.path().join(zone).join("temp"), temp).unwrap();
        }
        assert_eq!(hottest_zone(dir.path()), Some(63_500));
    }

    #[test]
    fn pi_firmware_throttle_words_map_to_current_flags() {
        assert_eq!(parse_throttled("throttled=0x0\n"), Some(ThrottleFlags(0)));
        assert_eq!(
            parse_throttled("throttled=0x50005"),
            Some(ThrottleFlags(0x5))
        );
        assert_eq!(parse_throttled("error"), None);
    }

    #[test]
    fn simulated_readings_are_plausible_and_rise_with_load() {
        for p in Profile::ALL {
            let mut idle = Sampler::new(Some(p));
            let mut busy = Sampler::new(Some(p));
            let a = idle.sample(0);
            let b = busy.sample(p.spec().cores);
            assert!(a.cpu_load_permille < b.cpu_load_permille, "{p}");
            assert!(a.temp_millic < b.temp_millic, "{p}");
            let t = b.temp_millic.unwrap();
            assert!((30_000..80_000).contains(&t), "{p}: {t}");
            assert!(b.mem_free_bytes.unwrap() < p.spec().mem_total_bytes);
        }
    }

    #[test]
    fn simulated_jitter_is_reproducible() {
        let mut a = Sampler::new(Some(Profile::Pi4));
        let mut b = Sampler::new(Some(Profile::Pi4));
        for _ in 0..5 {
            assert_eq!(a.sample(1), b.sample(1));
        }
    }

    #[test]
    fn the_real_machine_reports_what_it_can() {
        let mut s = Sampler::new(None);
        let r = s.sample(0);
        assert!(s.cores() >= 1);
        if let Some(load) = r.cpu_load_permille {
            assert!(load <= 1000);
        }
    }
}
