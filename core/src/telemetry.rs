use serde::{Deserialize, Serialize};

use crate::BreakerState;

/// Throttling reported by the device's firmware (Raspberry Pi `vcgencmd get_throttled` bits,
/// or the kernel's thermal state elsewhere). Only the *current* conditions are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleFlags(pub u8);

impl ThrottleFlags {
    /// Supply voltage is below the safe level now.
    pub const UNDER_VOLTAGE: u8 = 1 << 0;
    /// The ARM frequency is capped now.
    pub const FREQ_CAPPED: u8 = 1 << 1;
    /// The CPU is throttled now.
    pub const THROTTLED: u8 = 1 << 2;
    /// The soft temperature limit is active now.
    pub const SOFT_TEMP_LIMIT: u8 = 1 << 3;

    /// Maps the low nibble of the Pi firmware's `get_throttled` word to flags.
    pub fn from_pi_firmware(word: u32) -> Self {
        Self((word & 0xf) as u8)
    }

    /// Whether any condition is present.
    pub fn is_any(self) -> bool {
        self.0 != 0
    }
}

/// One reading of a device. Integers in named units, so every target decides identically.
///
/// A reading the device cannot provide is `None`, never zero: a board without a thermal
/// sensor has `temp_millic: None`, not 0 °C.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TelemetrySample {
    /// Estimated bandwidth to the gateway, in kilobits per second.
    pub bandwidth_kbps: Option<u32>,
    /// Round-trip latency to the coordinator, in microseconds.
    pub latency_us: Option<u32>,
    /// CPU load across all cores, in permille (0 = idle, 1000 = fully busy).
    pub cpu_load_permille: Option<u16>,
    /// Memory available for new work, in bytes.
    pub mem_free_bytes: Option<u64>,
    /// Hottest thermal zone, in millidegrees Celsius.
    pub temp_millic: Option<i32>,
    /// Current throttling conditions.
    pub throttle: ThrottleFlags,
    /// Tasks executing now.
    pub tasks_running: u16,
    /// Task errors counted by the device's breaker since it last closed.
    pub errors: u32,
    /// The device's own breaker state.
    pub breaker: BreakerState,
    /// `true` when the readings come from a simulated device profile, not the machine.
    pub simulated: bool,
}
