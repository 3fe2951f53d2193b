//! Gateways started in the test process (the library's `gateway::start`),
//! each with its own metrics registry and an in-memory local side the test
//! reads. Links between them are real: mutual TLS over loopback sockets.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use wandist::gateway::{self, Running};
use wandist::local::ToLocal;
use wandist::metrics::Metrics;

use super::{metric_value, SOON};

pub struct InProc {
    pub name: String,
    pub running: Option<Running>,
    pub rx: mpsc::Receiver<ToLocal>,
    _dir: tempfile::TempDir,
}

impl InProc {
    /// Starts a gateway from config text whose local side is its
    /// `[erlang]` cluster.
    pub async fn start_erlang(name: &str, body: &str) -> InProc {
        init_logging();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, body).unwrap();
        let prepared = gateway::prepare(&path).unwrap_or_else(|p| panic!("{name}: bad config: {p:?}"));
        let running = wandist::app::start(prepared, Metrics::new()).await.unwrap();
        let (_tx, rx) = mpsc::channel(1);
        InProc { name: name.to_string(), running: Some(running), rx, _dir: dir }
    }

    /// Starts a gateway from config text with an in-memory local side;
    /// `queue` is the size of its to-local channel (small values let a test
    /// stall the local side).
    pub async fn start(name: &str, body: &str, queue: usize) -> InProc {
        init_logging();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, body).unwrap();
        let prepared = gateway::prepare(&path).unwrap_or_else(|p| panic!("{name}: bad config: {p:?}"));
        let mut running = gateway::start(prepared, Metrics::new(), queue).await.unwrap();
        // One queue of `queue` items (the routes' inboxes merged; each
        // route's forwarder holds one more item at most).
        let rx = running.merged_inbox(queue);
        InProc { name: name.to_string(), running: Some(running), rx, _dir: dir }
    }

    /// Where its configuration file is (rewrite it, then `reload`).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("gateway.toml")
    }

    /// Loads its configuration file again and applies it, as SIGHUP does.
    pub fn reload(&mut self) -> gateway::Reloaded {
        let loaded = gateway::prepare(&self.config_path());
        self.running.as_mut().expect("stopped").reload(loaded)
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("stopped")
    }

    pub fn peer_addr(&self) -> std::net::SocketAddr {
        self.running().peers.expect("no listener")
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.running().metrics.render(), name, labels)
    }

    /// Waits (asynchronously, bounded) until `name{labels}` satisfies `ok`.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + SOON;
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(v) = self.metric(name, labels).filter(|v| ok(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting for {name}{labels:?}; now {:?}",
                self.name,
                self.metric(name, labels)
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

/// Receives the next item, bounded by SOON; skips `Up` notices (every
/// route sends one when it first comes up).
pub async fn next(rx: &mut mpsc::Receiver<ToLocal>, what: &str) -> ToLocal {
    loop {
        let item = tokio::time::timeout(SOON, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap_or_else(|| panic!("channel closed waiting for {what}"));
        if !matches!(item, ToLocal::Up { .. } | ToLocal::Synced { .. }) {
            return item;
        }
    }
}

/// Takes `n` confirmations, each `delivered`, in token order 0, 1, 2…
/// (route notices between them are skipped; anything else fails).
pub async fn delivered_in_order(rx: &mut mpsc::Receiver<ToLocal>, n: u64, what: &str) {
    let mut confirmed = 0;
    while confirmed < n {
        match next(rx, what).await {
            ToLocal::Confirm { token, outcome: wandist::route::Outcome::Delivered, .. } => {
                assert_eq!(token.0, confirmed, "confirmed out of order");
                confirmed += 1;
            }
            ToLocal::Lost { .. } | ToLocal::Members { .. } => {}
            other => panic!("{what}: {other:?} after {confirmed} delivered"),
        }
    }
}

/// Logs of in-process gateways on stderr when WANDIST_TEST_LOG is set (its
/// value is the filter, e.g. "debug").
fn init_logging() {
    if let Ok(filter) = std::env::var("WANDIST_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(if filter.is_empty() { "info".into() } else { filter }))
            .with_test_writer()
            .try_init();
    }
}
