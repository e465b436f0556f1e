//! Telemetry: one sample at a time from the host, signed with the breaker's state and the
//! link's measurements, each followed by a ping (every few a large one, for bandwidth).

use super::*;

pub(super) fn telemetry_frame<M>(frame: impl Into<Bytes>) -> Action<M> {
    Action::Publish {
        leaf: Leaf::Telemetry,
        qos: QoS::AtMostOnce,
        retain: false,
        payload: frame.into(),
        report: None,
    }
}

impl<M: Clone> Node<M> {
    pub(super) fn sample(&mut self, out: &mut Vec<Action<M>>) {
        if self.sampling {
            return;
        }
        self.sampling = true;
        let running = self.slots_used.min(usize::from(u16::MAX)) as u16;
        out.push(Action::Sample { running });
    }

    pub(super) fn on_reading(&mut self, now: Instant, reading: Reading, out: &mut Vec<Action<M>>) {
        self.sampling = false;
        let (extra_latency, link_kbps) = self.settings.link_offset.unwrap_or((0, u32::MAX));
        let mut sample = TelemetrySample {
            bandwidth_kbps: self.link.bandwidth_kbps().map(|b| b.min(link_kbps)),
            latency_us: self
                .link
                .latency_us()
                .map(|l| l.saturating_add(extra_latency)),
            cpu_load_permille: reading.cpu_load_permille,
            mem_free_bytes: reading.mem_free_bytes,
            temp_millic: reading.temp_millic,
            throttle: reading.throttle,
            tasks_running: self.slots_used.min(usize::from(u16::MAX)) as u16,
            simulated: self.settings.simulated,
            ..TelemetrySample::default()
        };
        #[cfg(feature = "fault-injection")]
        self.settings.faults.boast(&mut sample);
        if let Some(t) = self.breaker.observe(self.now_ms(now), &sample) {
            log_transition(t);
        }
        sample.errors = self.breaker.errors();
        sample.breaker = self.breaker.state();
        out.push(Action::Sampled(sample.clone()));
        tracing::debug!(
            ?sample,
            dropped_frames = self.dropped_frames,
            duplicates = self.duplicates,
            "telemetry"
        );
        if !self.connected {
            return;
        }
        let telemetry = Telemetry {
            node: self.node,
            seq: self.telemetry_seq,
            boot_id: self.boot_id,
            sample,
        };
        self.telemetry_seq += 1;
        match sign_message(&self.identity, SignedTelemetry::TAG, &telemetry) {
            Ok(signature) => {
                let frame = Envelope::new(Message::Telemetry(SignedTelemetry {
                    telemetry,
                    signature,
                }));
                out.push(telemetry_frame(frame.to_vec()));
            }
            Err(e) => tracing::error!(error = %e, "cannot sign telemetry"),
        }
        self.ticks += 1;
        let every = u64::from(self.settings.bandwidth_probe_every.max(1));
        // The first ping is small (latency first); then every `every` intervals a large one.
        let padding = if self.ticks % every == 2 % every {
            vec![0u8; LARGE_PADDING]
        } else {
            Vec::new()
        };
        let nonce = self.next_nonce;
        self.next_nonce = nonce.wrapping_add(1);
        self.link.ping(self.micros(now), nonce, padding.len());
        let ping = Envelope::new(Message::Ping(Ping {
            node: self.node,
            nonce,
            padding: &padding,
        }));
        out.push(telemetry_frame(ping.to_vec()));
    }
}
