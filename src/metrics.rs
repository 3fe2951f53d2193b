//! Every metric name and its help text, the Prometheus recorder, and the
//! `/metrics` HTTP endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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

/// Label value for a peer whose identity is not known yet.
pub const UNKNOWN_PEER: &str = "unknown";

const RTT_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

fn describe() {
    describe_gauge!(
        LINK_UP,
        "Links up to a peer cluster, by role (primary: 0 or 1; standby: count)."
    );
    describe_histogram!(
        LINK_RTT,
        Unit::Seconds,
        "Heartbeat round-trip time per peer cluster."
    );
    describe_counter!(
        LINK_CONNECTS,
        "Links established (handshake completed) per peer cluster."
    );
    describe_counter!(LINK_DISCONNECTS, "Links lost per peer cluster, by reason.");
    describe_counter!(
        HANDSHAKE_FAILURES,
        "Connections that failed before a link was established, by reason."
    );
    describe_counter!(
        FRAMES_REJECTED,
        "Frames from a peer rejected as invalid (the link is closed), by reason."
    );
    describe_counter!(
        BYTES_SENT,
        Unit::Bytes,
        "Bytes written to peer links, after framing, before TLS."
    );
    describe_counter!(
        BYTES_RECEIVED,
        Unit::Bytes,
        "Bytes read from peer links, after TLS."
    );
}

/// Installs the process-wide recorder. Call once, before any metric is touched.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(LINK_RTT.to_string()), RTT_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    Ok(handle)
}

/// Serves `/metrics` until `cancel`. Requests are bounded in size and time.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let handle = handle.clone();
                tracker.spawn(async move {
                    if let Err(e) =
                        tokio::time::timeout(Duration::from_secs(10), answer(stream, &handle)).await
                    {
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

async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", handle.render()),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Where the metrics endpoint is, for log lines.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}
