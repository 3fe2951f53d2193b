//! Every metric name and its help text, the Prometheus recorder, and the
//! `/metrics` HTTP endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const LINK_UP: &str = "wandist_link_up";
pub const LINK_RTT: &str = "wandist_link_rtt_seconds";
pub const LINK_CONNECTS: &str = "wandist_link_connects_total";
pub const LINK_DISCONNECTS: &str = "wandist_link_disconnects_total";
pub const HANDSHAKE_FAILURES: &str = "wandist_handshake_failures_total";
pub const FRAMES_REJECTED: &str = "wandist_frames_rejected_total";
pub const BYTES_SENT: &str = "wandist_bytes_sent_total";
pub const BYTES_RECEIVED: &str = "wandist_bytes_received_total";

pub const ROUTE_UP: &str = "wandist_route_up";
pub const ROUTE_STANDBY: &str = "wandist_route_standby";
pub const FAILOVERS: &str = "wandist_failovers_total";
pub const MESSAGES_SENT: &str = "wandist_messages_sent_total";
pub const MESSAGES_DELIVERED: &str = "wandist_messages_delivered_total";
pub const MESSAGES_FAILED: &str = "wandist_messages_failed_total";
pub const MESSAGES_RECEIVED: &str = "wandist_messages_received_total";
pub const UNACKED_MESSAGES: &str = "wandist_unacked_messages";
pub const WINDOW_MESSAGES: &str = "wandist_window_messages";
pub const COMPRESSION_BYTES: &str = "wandist_compression_bytes_total";
pub const UNACKED_BYTES: &str = "wandist_unacked_bytes";
pub const RETRANSMITTED: &str = "wandist_retransmitted_messages_total";
pub const DUPLICATES_DROPPED: &str = "wandist_duplicates_dropped_total";
pub const ACK_LATENCY: &str = "wandist_ack_latency_seconds";
pub const GROUPS: &str = "wandist_groups";
pub const MEMBERS: &str = "wandist_members";
pub const ADVERTS_REJECTED: &str = "wandist_adverts_rejected_total";

pub const CERT_EXPIRY: &str = "wandist_certificate_expiry_seconds";
pub const CONFIG_RELOADS: &str = "wandist_config_reloads_total";
pub const CONFIG_RESTART_NEEDED: &str = "wandist_config_restart_needed";

pub const ERLANG_NODES_CONNECTED: &str = "wandist_erlang_nodes_connected";
pub const ERLANG_NODE_UP: &str = "wandist_erlang_node_up";
pub const BUILD_INFO: &str = "wandist_build_info";
pub const PROXIES: &str = "wandist_proxies";
pub const ERLANG_MESSAGES: &str = "wandist_erlang_messages_total";
pub const ERLANG_REJECTED: &str = "wandist_erlang_rejected_total";
pub const PEER_QUOTA_USED: &str = "wandist_peer_quota_used";
pub const PEER_QUOTA_LIMIT: &str = "wandist_peer_quota_limit";
pub const PEER_THROTTLED: &str = "wandist_peer_throttled_total";
pub const METRICS_CONNECTIONS_REFUSED: &str = "wandist_metrics_connections_refused_total";

/// Label value for a peer whose identity is not known yet.
pub const UNKNOWN_PEER: &str = "unknown";
/// Label value for what a local node (not a peer) sent.
pub const LOCAL_PEER: &str = "local";

const LATENCY_BUCKETS: &[f64] =
    &[0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

const HELP: &[(&str, Kind, Option<Unit>, &str)] = &[
    (LINK_UP, Kind::Gauge, None, "Links up to a peer cluster, by role (primary: 0 or 1; standby: count)."),
    (
        CERT_EXPIRY,
        Kind::Gauge,
        Some(Unit::Seconds),
        "When this gateway's certificate expires (unix time); alert on it minus time().",
    ),
    (LINK_RTT, Kind::Histogram, Some(Unit::Seconds), "Heartbeat round-trip time per peer cluster."),
    (LINK_CONNECTS, Kind::Counter, None, "Links established (handshake completed) per peer cluster."),
    (LINK_DISCONNECTS, Kind::Counter, None, "Links lost per peer cluster, by reason."),
    (HANDSHAKE_FAILURES, Kind::Counter, None, "Connections that failed before a link was established, by reason."),
    (FRAMES_REJECTED, Kind::Counter, None, "Invalid frames from a peer (the link is closed), by reason."),
    (BYTES_SENT, Kind::Counter, Some(Unit::Bytes), "Bytes written to peer links, after framing, before TLS."),
    (BYTES_RECEIVED, Kind::Counter, Some(Unit::Bytes), "Bytes read from peer links, after TLS."),
    (ROUTE_UP, Kind::Gauge, None, "1 while at least one link to the peer cluster is up."),
    (
        ROUTE_STANDBY,
        Kind::Gauge,
        None,
        "1 while the peer refuses this instance because another instance of this cluster holds the route (route down here by design).",
    ),
    (FAILOVERS, Kind::Counter, None, "Primary links lost with a standby promoted in their place."),
    (MESSAGES_SENT, Kind::Counter, None, "Messages accepted from the local cluster for the peer."),
    (MESSAGES_DELIVERED, Kind::Counter, None, "Messages the peer confirmed delivered to its cluster."),
    (MESSAGES_FAILED, Kind::Counter, None, "Messages reported failed (never silently dropped), by reason."),
    (MESSAGES_RECEIVED, Kind::Counter, None, "Messages from the peer delivered to the local cluster."),
    (UNACKED_MESSAGES, Kind::Gauge, None, "Messages sent or waiting to be sent, not yet confirmed."),
    (WINDOW_MESSAGES, Kind::Gauge, None, "The route's window: messages in flight at most (window_messages)."),
    (COMPRESSION_BYTES, Kind::Counter, Some(Unit::Bytes), "Data batches compressed for the peer: bytes before (raw) and after (packed)."),
    (UNACKED_BYTES, Kind::Gauge, Some(Unit::Bytes), "Payload bytes of unconfirmed messages."),
    (RETRANSMITTED, Kind::Counter, None, "Messages sent again after a failover."),
    (DUPLICATES_DROPPED, Kind::Counter, None, "Messages from the peer dropped as already received."),
    (ACK_LATENCY, Kind::Histogram, Some(Unit::Seconds), "From a message's first transmission to its ack."),
    (GROUPS, Kind::Gauge, None, "Process groups exported to / imported from the peer."),
    (MEMBERS, Kind::Gauge, None, "Group members exported to / imported from the peer."),
    (
        ADVERTS_REJECTED,
        Kind::Counter,
        None,
        "Membership adverts (or groups in them) refused, by reason: not the peer's own cluster, over a limit, a bad group name.",
    ),
    (CONFIG_RELOADS, Kind::Counter, None, "Configuration reloads (SIGHUP), by result: applied, or error (the running configuration kept)."),
    (
        CONFIG_RESTART_NEEDED,
        Kind::Gauge,
        None,
        "1 while the last configuration loaded has changes only a restart applies (the log names them).",
    ),
    (ERLANG_NODES_CONNECTED, Kind::Gauge, None, "Local Erlang nodes connected."),
    (ERLANG_NODE_UP, Kind::Gauge, None, "1 while the gateway is connected to this local Erlang node, by node."),
    (BUILD_INFO, Kind::Gauge, None, "Always 1; the labels say which wandist runs (version)."),
    (PROXIES, Kind::Gauge, None, "Proxy pids and references held, for all peers."),
    (ERLANG_MESSAGES, Kind::Counter, None, "Erlang messages relayed, by direction."),
    (
        ERLANG_REJECTED,
        Kind::Counter,
        None,
        "Messages and packets dropped on the Erlang side, by peer (or local) and reason (forged, stale_handle, atom_budget, ...).",
    ),
    (PEER_QUOTA_USED, Kind::Gauge, None, "How much of a per-peer quota is in use (proxies, handles, monitors, atoms, pending)."),
    (PEER_QUOTA_LIMIT, Kind::Gauge, None, "The per-peer quota configured for the route."),
    (
        PEER_THROTTLED,
        Kind::Counter,
        None,
        "Times a peer's messages were refused faster than its max_refusals_per_second and its route was not read for a while.",
    ),
    (
        METRICS_CONNECTIONS_REFUSED,
        Kind::Counter,
        None,
        "Connections to the metrics endpoint refused (over its connection cap).",
    ),
];

/// One gateway's metrics: its own registry, so several gateways can live
/// in one process (tests) without mixing their figures.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// What `/status` and `/readyz` answer from (`status`).
    board: crate::status::Board,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

static METADATA: Metadata<'static> = Metadata::new("wandist", Level::INFO, Some("wandist"));

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect::<Vec<_>>())
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), LATENCY_BUCKETS)
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        for (name, kind, unit, help) in HELP {
            let name = KeyName::from_const_str(name);
            match kind {
                Kind::Counter => recorder.describe_counter(name, *unit, (*help).into()),
                Kind::Gauge => recorder.describe_gauge(name, *unit, (*help).into()),
                Kind::Histogram => recorder.describe_histogram(name, *unit, (*help).into()),
            }
        }
        let handle = recorder.handle();
        Metrics { inner: Arc::new(Inner { recorder, handle, board: crate::status::Board::default() }) }
    }

    /// The status board (`/status`, `/readyz`), shared with the metrics.
    pub fn board(&self) -> &crate::status::Board {
        &self.inner.board
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.inner.recorder.register_counter(&key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.inner.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.inner.recorder.register_histogram(&key(name, labels), &METADATA)
    }

    /// Folds the samples histograms collected since the last call into
    /// their summaries. Without it, samples pile up until a scrape: a busy
    /// gateway nobody scrapes would grow by 8 bytes per message.
    pub fn run_upkeep(&self) {
        self.inner.handle.run_upkeep()
    }

    /// Runs `run_upkeep` every UPKEEP until cancelled.
    pub async fn upkeep(self, cancel: CancellationToken) {
        let mut every = tokio::time::interval(UPKEEP);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = every.tick() => self.run_upkeep(),
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.inner.handle.render()
    }
}

/// How often histogram samples are folded into summaries.
const UPKEEP: Duration = Duration::from_secs(1);
/// Connections the metrics endpoint serves at once; more are closed at once
/// (and counted): anyone who can reach the port could otherwise hold
/// file descriptors without end.
pub const MAX_CONNECTIONS: usize = 64;
/// A request must have arrived whole within this.
const READ_DEADLINE: Duration = Duration::from_secs(2);
/// And its answer been written within this.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// Serves `/metrics`, `/healthz` (alive), `/readyz` and `/status` until `cancel`: at most
/// MAX_CONNECTIONS at once, each bounded in size and time.
pub async fn serve(listener: TcpListener, metrics: Metrics, cancel: CancellationToken, tracker: TaskTracker) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let refused = metrics.counter(METRICS_CONNECTIONS_REFUSED, &[]);
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    refused.increment(1);
                    drop(stream);
                    continue;
                };
                let metrics = metrics.clone();
                tracker.spawn(async move {
                    let _slot = slot;
                    if let Err(e) = tokio::time::timeout(ANSWER_DEADLINE, answer(stream, &metrics)).await {
                        tracing::debug!(%peer, "metrics request timed out: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + READ_DEADLINE;
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") => match crate::status::readyz(&metrics.board().status()) {
            (true, body) => ("200 OK", "application/json", body),
            (false, body) => ("503 Service Unavailable", "application/json", body),
        },
        ("GET", "/status") => {
            let status = metrics.board().status();
            let body = serde_json::to_string_pretty(&status).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
            ("200 OK", "application/json", body + "\n")
        }
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics, /healthz, /readyz or /status\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Where the metrics endpoint is, for log lines.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}
