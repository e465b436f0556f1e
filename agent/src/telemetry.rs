//! Readings of the machine (or of a simulated board): CPU load, free memory, temperature,
//! firmware throttling. A reading the machine cannot give is `None`, never invented.
//!
//! The temperature is the hottest thermal zone under `/sys/class/thermal` that counts: zones
//! whose `type` is in [`ThermalZones::ignore`] are left out (a Jetson's `PMIC-Die` reads a fixed
//! 100 °C placeholder), readings outside −40 °C to 150 °C are sensors that are off (a Jetson
//! Orin's idle CV clusters read −256 °C), and when any zone in [`ThermalZones::prefer`] reads,
//! only those count. A Raspberry Pi's throttle word comes from
//! `/sys/devices/platform/soc/soc:firmware/get_throttled` where the kernel has it, else from
//! `vcgencmd get_throttled`.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::Command;

use ambient_core::{ThrottleFlags, sha3_256};

use crate::profile::{Heater, Profile, SimSpec};

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
    /// A simulated board, or the real machine read through `zones`.
    pub fn new(simulate: Option<Profile>, zones: ThermalZones, heater: Heater) -> Self {
        match simulate {
            Some(p) => Self::Simulated(SimSampler::new(p, heater)),
            None => Self::Real(Box::new(RealSampler::new(Path::new("/sys"), zones))),
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

/// Which thermal zones count, by the sensor name in each zone's `type` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ThermalZones {
    /// Zones left out.
    pub ignore: Vec<String>,
    /// Zones that alone count when any of them reads.
    pub prefer: Vec<String>,
}

impl ThermalZones {
    /// The built-in choice for a board, by its device-tree model: a Jetson leaves out
    /// `PMIC-Die` (a fixed placeholder), a Raspberry Pi reads `cpu-thermal`; any other machine
    /// leaves out `PMIC-Die` too and takes the hottest zone.
    pub fn for_model(model: Option<&str>) -> Self {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        match model {
            Some(m) if m.contains("Raspberry Pi") => Self {
                ignore: Vec::new(),
                prefer: names(&["cpu-thermal"]),
            },
            _ => Self {
                ignore: names(&["PMIC-Die"]),
                prefer: Vec::new(),
            },
        }
    }
}

/// Zone readings outside this range, in millidegrees, come from sensors that are off.
const PLAUSIBLE_MILLIC: RangeInclusive<i32> = -40_000..=150_000;

/// The device-tree model under a sysfs root (`/sys/firmware/devicetree/base/model`, which
/// `/proc/device-tree/model` links to), without its trailing NUL.
pub(crate) fn board_model(sys: &Path) -> Option<String> {
    let raw = std::fs::read(sys.join("firmware/devicetree/base/model")).ok()?;
    Some(
        String::from_utf8_lossy(&raw)
            .trim_end_matches(['\0', '\n'])
            .to_owned(),
    )
}

/// The real machine, through sysinfo, sysfs and `vcgencmd`.
pub(crate) struct RealSampler {
    system: Option<sysinfo::System>,
    cores: u16,
    mem_total: u64,
    thermal_root: PathBuf,
    zones: ThermalZones,
    throttled_file: PathBuf,
    vcgencmd: Option<PathBuf>,
}

impl RealSampler {
    /// Reads the machine whose sysfs is mounted at `sys` (`/sys`; tests pass recorded trees).
    fn new(sys: &Path, zones: ThermalZones) -> Self {
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
            thermal_root: sys.join("class/thermal"),
            zones,
            throttled_file: sys.join("devices/platform/soc/soc:firmware/get_throttled"),
            vcgencmd: find_in_path("vcgencmd"),
        }
    }

    /// The temperature and throttle flags, the readings that depend on the board.
    fn board_readings(&self) -> (Option<i32>, ThrottleFlags) {
        let throttle = std::fs::read_to_string(&self.throttled_file)
            .ok()
            .and_then(|word| parse_throttle_word(&word))
            .or_else(|| self.vcgencmd.as_deref().and_then(pi_throttle))
            .unwrap_or_default();
        (board_temperature(&self.thermal_root, &self.zones), throttle)
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
        let (temp_millic, throttle) = self.board_readings();
        Reading {
            cpu_load_permille: cpu,
            mem_free_bytes: mem,
            temp_millic,
            throttle,
        }
    }
}

/// The hottest zone under `root` (`/sys/class/thermal`) that counts by `zones` (see the
/// module docs), in millidegrees; `None` when none does.
pub(crate) fn board_temperature(root: &Path, zones: &ThermalZones) -> Option<i32> {
    let entries = std::fs::read_dir(root).ok()?;
    let readings: Vec<(String, i32)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .filter_map(|e| {
            let temp = std::fs::read_to_string(e.path().join("temp")).ok()?;
            let kind = std::fs::read_to_string(e.path().join("type")).unwrap_or_default();
            Some((kind.trim().to_owned(), temp.trim().parse::<i32>().ok()?))
        })
        .filter(|(kind, temp)| PLAUSIBLE_MILLIC.contains(temp) && !zones.ignore.contains(kind))
        .collect();
    let hottest = |preferred_only: bool| {
        readings
            .iter()
            .filter(|(kind, _)| !preferred_only || zones.prefer.contains(kind))
            .map(|(_, temp)| *temp)
            .max()
    };
    hottest(true).or_else(|| hottest(false))
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
    parse_throttle_word(text.trim().strip_prefix("throttled=")?)
}

/// The firmware's throttle word in hex, with or without `0x`, as sysfs and vcgencmd give it.
fn parse_throttle_word(word: &str) -> Option<ThrottleFlags> {
    u32::from_str_radix(word.trim().trim_start_matches("0x"), 16)
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
    board_model(Path::new("/sys")).is_some_and(|m| m.contains("Raspberry Pi"))
}

/// A simulated board: load follows the tasks running, temperature follows load, and each
/// reading carries a small jitter derived from the sample number, so runs are reproducible.
pub(crate) struct SimSampler {
    profile: Profile,
    spec: SimSpec,
    heater: Heater,
    n: u64,
}

impl SimSampler {
    fn new(profile: Profile, heater: Heater) -> Self {
        Self {
            profile,
            spec: profile.spec(),
            heater,
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
            + self.jitter(2, 600)
            + i64::from(self.heater.millic());
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
        let zones = ThermalZones::default();
        assert_eq!(board_temperature(dir.path(), &zones), None);
        for (zone, temp) in [
            ("thermal_zone0", "41000\n"),
            ("thermal_zone1", "63500\n"),
            ("cooling_device0", "99"),
        ] {
            std::fs::create_dir(dir.path().join(zone)).unwrap();
            std::fs::write(dir.path().join(zone).join("temp"), temp).unwrap();
        }
        assert_eq!(board_temperature(dir.path(), &zones), Some(63_500));
    }

    /// The readings of a board whose sysfs was recorded under `tests/fixtures/sys/<board>`,
    /// with the zones chosen for its model.
    fn recorded(board: &str) -> (Option<String>, Option<i32>, ThrottleFlags) {
        let sys = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sys")
            .join(board);
        assert!(sys.is_dir(), "{} is committed", sys.display());
        let model = board_model(&sys);
        let sampler = RealSampler::new(&sys, ThermalZones::for_model(model.as_deref()));
        let (temp, throttle) = sampler.board_readings();
        (model, temp, throttle)
    }

    #[test]
    fn a_pi_4_reads_its_cpu_zone_and_the_firmware_throttle_word_from_sysfs() {
        let (model, temp, throttle) = recorded("pi4");
        assert!(model.unwrap().starts_with("Raspberry Pi 4 Model B"));
        assert_eq!(temp, Some(48_686));
        // 0x50005: under-voltage and throttling now (and both since boot, not reported).
        assert_eq!(
            throttle,
            ThrottleFlags(ThrottleFlags::UNDER_VOLTAGE | ThrottleFlags::THROTTLED)
        );
    }

    #[test]
    fn a_pi_5_reads_its_cpu_zone_and_is_not_throttled() {
        let (model, temp, throttle) = recorded("pi5");
        assert!(model.unwrap().starts_with("Raspberry Pi 5"));
        assert_eq!(temp, Some(52_150));
        assert_eq!(throttle, ThrottleFlags(0));
    }

    #[test]
    fn a_jetson_orin_ignores_the_pmic_placeholder_and_its_powered_down_cv_sensors() {
        let (model, temp, throttle) = recorded("jetson-orin-nano");
        assert!(model.unwrap().contains("Jetson"));
        // PMIC-Die reads 100 °C and the CV clusters -256 °C; the hottest real zone is tj.
        assert_eq!(temp, Some(47_906));
        assert_eq!(throttle, ThrottleFlags(0), "no Pi firmware, no vcgencmd");
    }

    #[test]
    fn configured_zones_override_the_boards_choice() {
        let sys = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sys/jetson-orin-nano");
        let gpu_only = ThermalZones {
            ignore: Vec::new(),
            prefer: vec!["gpu-thermal".into()],
        };
        let sampler = RealSampler::new(&sys, gpu_only);
        assert_eq!(sampler.board_readings().0, Some(46_187));
        let everything = RealSampler::new(&sys, ThermalZones::default());
        assert_eq!(
            everything.board_readings().0,
            Some(100_000),
            "the placeholder, if asked"
        );
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
            let mut idle = Sampler::new(Some(p), ThermalZones::default(), Heater::default());
            let mut busy = Sampler::new(Some(p), ThermalZones::default(), Heater::default());
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
        let mut a = Sampler::new(
            Some(Profile::Pi4),
            ThermalZones::default(),
            Heater::default(),
        );
        let mut b = Sampler::new(
            Some(Profile::Pi4),
            ThermalZones::default(),
            Heater::default(),
        );
        for _ in 0..5 {
            assert_eq!(a.sample(1), b.sample(1));
        }
    }

    #[test]
    fn a_heated_simulated_device_reports_the_extra_heat_while_it_lasts() {
        let heater = Heater::default();
        let mut plain = Sampler::new(
            Some(Profile::Pi4),
            ThermalZones::default(),
            Heater::default(),
        );
        let mut heated = Sampler::new(Some(Profile::Pi4), ThermalZones::default(), heater.clone());
        heater.set_millic(40_000);
        let (a, b) = (plain.sample(0).temp_millic, heated.sample(0).temp_millic);
        assert_eq!(b.unwrap() - a.unwrap(), 40_000);
        heater.set_millic(0);
        assert_eq!(plain.sample(0).temp_millic, heated.sample(0).temp_millic);
    }

    #[test]
    fn the_real_machine_reports_what_it_can() {
        let mut s = Sampler::new(None, ThermalZones::default(), Heater::default());
        let r = s.sample(0);
        assert!(s.cores() >= 1);
        if let Some(load) = r.cpu_load_permille {
            assert!(load <= 1000);
        }
    }
}
