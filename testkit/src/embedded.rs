//! The embedded broker (`ambient-broker`, the one `ambient coordinator` runs) on a free
//! loopback port, for tests that need a broker but not mosquitto's particulars.

use std::net::SocketAddr;

use ambient_broker::{Broker, BrokerConfig, BrokerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An embedded broker serving `127.0.0.1:<free port>` in a task of the current tokio runtime,
/// open to every client (no gatekeeper), with the default limits. Dropping it asks it to stop:
/// it closes its connections and ends, as `ambient coordinator` does on a signal.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    _task: JoinHandle<Result<(), BrokerError>>,
}

impl EmbeddedBroker {
    /// Binds a free loopback port and serves it.
    ///
    /// # Panics
    /// Outside a tokio runtime, or when no loopback port can be bound.
    pub async fn start() -> Self {
        let broker = Broker::bind(([127, 0, 0, 1], 0).into(), BrokerConfig::default())
            .await
            .unwrap_or_else(|e| panic!("cannot bind the embedded broker on loopback: {e}"));
        let addr = broker.local_addr();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(broker.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            _task: task,
        }
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
