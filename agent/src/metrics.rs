//! The agent's own Prometheus metrics, served at `GET /metrics` when `metrics = "ADDR"` (or
//! `--metrics ADDR`) is set; off by default.
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `ambient_agent_executions_total{exit}` | counter | runs finished, by how they ended (`ok`, `trapped`, `out_of_fuel`, …) |
//! | `ambient_agent_fuel_total` | counter | fuel those runs consumed |
//! | `ambient_agent_execution_seconds` | histogram | wall time of a run, compile excluded |
//! | `ambient_agent_outbox_reports` | gauge | reports not yet acknowledged by the broker |
//! | `ambient_agent_tasks_running` | gauge | tasks executing now |
//! | `ambient_agent_temperature_celsius` | gauge | the board's reading (absent while there is none) |
//! | `ambient_agent_breaker{state}` | gauge | 1 for the device's own breaker's state, 0 for the others |
//!
//! The server is as small as the job: it answers `GET /metrics` and nothing else (404), one
//! request per connection, at most [`MAX_CONNECTIONS`] at once, each within
//! [`REQUEST_TIMEOUT`]. Like the coordinator's HTTP API it has no authentication: keep it on
//! loopback or a management network.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use ambient_core::{BreakerState, Exit};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Scrapes served at once; further connections are closed at once.
pub const MAX_CONNECTIONS: usize = 8;
/// Time a scraper has to send its request and read the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabel {
    exit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// Every metric, registered once; cheap to update from the agent's loop.
pub(crate) struct Metrics {
    registry: Registry,
    executions: Family<ExitLabel, Counter>,
    fuel: Counter,
    seconds: Histogram,
    outbox: Gauge,
    running: Gauge,
    temperature: Gauge<f64, AtomicU64>,
    breaker: Family<StateLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ambient_agent");
        let executions = Family::<ExitLabel, Counter>::default();
        let fuel = Counter::default();
        // 100 µs to about 52 s.
        let seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 20));
        let (outbox, running) = (Gauge::default(), Gauge::default());
        let temperature = Gauge::<f64, AtomicU64>::default();
        let breaker = Family::<StateLabel, Gauge>::default();
        let r = &mut registry;
        r.register(
            "executions",
            "Runs finished, by how they ended",
            executions.clone(),
        );
        r.register("fuel", "Fuel consumed by finished runs", fuel.clone());
        r.register(
            "execution_seconds",
            "Wall time of a run, compile excluded",
            seconds.clone(),
        );
        r.register(
            "outbox_reports",
            "Reports not yet acknowledged by the broker",
            outbox.clone(),
        );
        r.register("tasks_running", "Tasks executing now", running.clone());
        r.register(
            "temperature_celsius",
            "The board's temperature reading",
            temperature.clone(),
        );
        r.register(
            "breaker",
            "1 for the device's own breaker's state, 0 for the others",
            breaker.clone(),
        );
        Self {
            registry,
            executions,
            fuel,
            seconds,
            outbox,
            running,
            temperature,
            breaker,
        }
    }
}

impl Metrics {
    /// A run ended with `exit` after `fuel` and `elapsed`.
    pub fn executed(&self, exit: Exit, fuel: u64, elapsed: Duration) {
        self.executions
            .get_or_create(&ExitLabel {
                exit: exit.as_str(),
            })
            .inc();
        self.fuel.inc_by(fuel);
        self.seconds.observe(elapsed.as_secs_f64());
    }

    /// The outbox holds `reports`.
    pub fn outbox(&self, reports: usize) {
        self.outbox.set(i64::try_from(reports).unwrap_or(i64::MAX));
    }

    /// A telemetry sample was taken.
    pub fn sampled(&self, temp_millic: Option<i32>, running: u16, breaker: BreakerState) {
        self.running.set(i64::from(running));
        if let Some(t) = temp_millic {
            self.temperature.set(f64::from(t) / 1000.0);
        }
        for (state, name) in [
            (BreakerState::Closed, "closed"),
            (BreakerState::Open, "open"),
            (BreakerState::HalfOpen, "half_open"),
        ] {
            self.breaker
                .get_or_create(&StateLabel { state: name })
                .set(i64::from(state == breaker));
        }
    }

    /// The exposition, as Prometheus text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    /// Not an HTTP request head, or larger than the buffer.
    Bad,
}

/// Routes a complete request head (up to and including the blank line).
fn route(head: &[u8]) -> Route {
    let Some(line) = head.split(|&b| b == b'\r').next() else {
        return Route::Bad;
    };
    let mut words = line.split(|&b| b == b' ');
    match (words.next(), words.next(), words.next()) {
        (Some(b"GET"), Some(path), Some(v)) if v.starts_with(b"HTTP/1.") => {
            let path = path.split(|&b| b == b'?').next().unwrap_or_default();
            if path == b"/metrics" {
                Route::Metrics
            } else {
                Route::NotFound
            }
        }
        _ => Route::Bad,
    }
}

/// Serves `GET /metrics` on `listener` until `stop`.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((socket, _)) = accepted else {
            // Out of file descriptors, most likely: let some close.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(socket, &metrics)).await;
            drop(slot);
        });
    }
}

async fn answer(mut socket: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            break;
        }
        let n = socket.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let (status, kind, body) = match route(&buf[..len]) {
        Route::Metrics => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        Route::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "this agent serves GET /metrics only\n".into(),
        ),
        Route::Bad => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "expected an HTTP/1 GET request\n".into(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    socket.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::Bad);
        assert_eq!(route(b"\x16\x03\x01 tls hello"), Route::Bad);
        assert_eq!(route(b""), Route::Bad);
    }

    #[test]
    fn the_exposition_counts_runs_by_exit_and_shows_the_current_breaker_state() {
        let m = Metrics::default();
        m.executed(Exit::Ok, 1_000, Duration::from_millis(2));
        m.executed(Exit::Ok, 500, Duration::from_millis(1));
        m.executed(Exit::Trapped, 7, Duration::from_millis(1));
        m.outbox(3);
        m.sampled(Some(71_500), 2, BreakerState::Open);
        let text = m.render();
        for line in [
            "ambient_agent_executions_total{exit=\"ok\"} 2",
            "ambient_agent_executions_total{exit=\"trapped\"} 1",
            "ambient_agent_fuel_total 1507",
            "ambient_agent_execution_seconds_count 3",
            "ambient_agent_outbox_reports 3",
            "ambient_agent_tasks_running 2",
            "ambient_agent_temperature_celsius 71.5",
            "ambient_agent_breaker{state=\"open\"} 1",
            "ambient_agent_breaker{state=\"closed\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[tokio::test]
    async fn a_scrape_over_tcp_gets_the_text_and_anything_else_a_404() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        metrics.executed(Exit::Ok, 42, Duration::from_millis(1));
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, metrics, stop.clone()));
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).await.unwrap();
            text
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("\nambient_agent_fuel_total 42\n"), "{ok}");
        assert!(get("/").await.starts_with("HTTP/1.1 404 "));
        stop.cancel();
        server.await.unwrap();
    }
}
