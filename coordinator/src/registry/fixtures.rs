//! Signed test traffic from real keys, shared by the registry's and the scheduler's tests.

use std::sync::OnceLock;
use std::time::Instant;

use std::time::Duration;

use ambient_core::{
    Announce, Engine, Identity, LARGE_PADDING, NodeId, Pong, SignedAnnounce, SignedTelemetry,
    Telemetry, TelemetrySample, sign_message,
};

use crate::{Registry, RegistryConfig};

/// One instant shared by every test, the registry's "start".
pub(crate) fn t0() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

pub(crate) fn identity(n: usize) -> Identity {
    let mut secret = [0x5a; 32];
    secret[..8].copy_from_slice(&(n as u64).to_le_bytes());
    Identity::from_secret(&secret)
}

pub(crate) fn announce(identity: &Identity) -> Announce {
    Announce {
        node: identity.node_id(),
        public_key: identity.public_key(),
        arch: "aarch64".parse().unwrap(),
        cores: 4,
        mem_total_bytes: 4 << 30,
        engine: Engine::Wasmtime,
        agent_version: "0.1.0".parse().unwrap(),
        labels: Default::default(),
        profile: None,
        max_concurrency: 2,
        fuel_per_s: None,
    }
}

pub(crate) fn sign_announce(identity: &Identity, announce: Announce) -> SignedAnnounce {
    let signature = sign_message(identity, SignedAnnounce::TAG, &announce).unwrap();
    SignedAnnounce {
        announce,
        signature,
    }
}

pub(crate) fn sign_telemetry(identity: &Identity, telemetry: Telemetry) -> SignedTelemetry {
    let signature = sign_message(identity, SignedTelemetry::TAG, &telemetry).unwrap();
    SignedTelemetry {
        telemetry,
        signature,
    }
}

/// A registry with `n` announced nodes and helpers to make them speak.
pub(crate) struct Fleet {
    pub(crate) registry: Registry,
    pub(crate) identities: Vec<Identity>,
    pub(crate) announces: Vec<Announce>,
    pub(crate) seqs: Vec<u64>,
}

impl Fleet {
    pub(crate) fn new(n: usize) -> Self {
        Self::with(n, |_| {})
    }

    /// `n` nodes announced at [`t0`], each announce adjusted by `adjust`, each followed by
    /// an empty signed sample (a node is eligible only once it has sent telemetry).
    pub(crate) fn with(n: usize, adjust: impl Fn(&mut Announce)) -> Self {
        Self::configured(RegistryConfig::default(), n, adjust)
    }

    pub(crate) fn configured(
        config: RegistryConfig,
        n: usize,
        adjust: impl Fn(&mut Announce),
    ) -> Self {
        let mut fleet = Self {
            registry: Registry::new(config),
            identities: (0..n).map(identity).collect(),
            announces: Vec::new(),
            seqs: vec![0; n],
        };
        for i in 0..n {
            let mut a = announce(&fleet.identities[i]);
            adjust(&mut a);
            fleet.announces.push(a);
            fleet.reannounce(t0(), i, |_| {});
            fleet.report(t0(), i, TelemetrySample::default());
        }
        fleet
    }

    pub(crate) fn id(&self, i: usize) -> NodeId {
        self.identities[i].node_id()
    }

    /// Node `i` announces again, with `change` applied to its last announce.
    pub(crate) fn reannounce(
        &mut self,
        now: Instant,
        i: usize,
        change: impl FnOnce(&mut Announce),
    ) {
        change(&mut self.announces[i]);
        let signed = sign_announce(&self.identities[i], self.announces[i].clone());
        self.registry.on_announce(now, &signed).unwrap();
    }

    /// Node `i`'s next telemetry sample (boot 1), signed and not yet delivered.
    pub(crate) fn telemetry(&mut self, i: usize, sample: TelemetrySample) -> SignedTelemetry {
        self.seqs[i] += 1;
        let telemetry = Telemetry {
            node: self.id(i),
            seq: self.seqs[i],
            boot_id: 1,
            sample,
        };
        sign_telemetry(&self.identities[i], telemetry)
    }

    /// Node `i` reports `sample`; the registry must accept it.
    pub(crate) fn report(&mut self, now: Instant, i: usize, sample: TelemetrySample) {
        let signed = self.telemetry(i, sample);
        self.registry.on_telemetry(now, &signed).unwrap();
    }

    /// The coordinator probes node `i` at `now` and the pong comes back `latency_us` later;
    /// with `kbps`, a large probe follows whose pong takes the padding's travel time at that
    /// bandwidth on top. Repeated calls are smoothed by the registry, as real probes are.
    pub(crate) fn link(&mut self, now: Instant, i: usize, latency_us: u64, kbps: Option<u64>) {
        let id = self.id(i);
        let nonce = self.seqs[i] << 32 | 0xffff;
        self.registry.probe_now(now, &id, nonce, 0);
        let pong = Pong::sign(&self.identities[i], &id, nonce);
        let back = now + Duration::from_micros(latency_us);
        self.registry.on_pong(now, back, id, &pong).unwrap();
        if let Some(kbps) = kbps {
            let travel = LARGE_PADDING as u64 * 8 * 1_000 / kbps.max(1);
            self.registry.probe_now(now, &id, nonce + 1, LARGE_PADDING);
            let pong = Pong::sign(&self.identities[i], &id, nonce + 1);
            let back = now + Duration::from_micros(latency_us + travel);
            self.registry.on_pong(now, back, id, &pong).unwrap();
        }
    }
}
