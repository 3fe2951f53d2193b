//! `[gateway]`, `[tls]` and `[metrics]`.

use toml_edit::TableLike;

use super::keys::{self, gateway as k};
use super::walk::Cx;
use super::{check_cluster_name, default_gateway_name, GatewayConfig, MetricsConfig, TlsFiles};

impl Cx<'_> {
    pub(super) fn gateway(&mut self, t: &dyn TableLike) -> Option<GatewayConfig> {
        self.allow(t, &k::TABLE);
        let cluster = self.required_string(t, "cluster", "[gateway]");
        if let Some((c, span)) = &cluster {
            if let Err(e) = check_cluster_name(c) {
                self.err(span.clone(), e);
            }
        }
        let name = match self.string(t, "name") {
            Some((n, span)) if n.is_empty() || n.len() > 255 => {
                self.err(span, "name must be 1 to 255 characters".into());
                String::new()
            }
            Some((n, _)) => n,
            None => default_gateway_name(),
        };
        let listen = self.socket_addr(t, "listen");
        let heartbeat = self.millis(t, &k::HEARTBEAT_MS);
        let dead_after = self.millis(t, &k::DEAD_AFTER_MS);
        if heartbeat >= dead_after {
            self.err(
                Self::key_span(t, "dead_after_ms").or_else(|| Self::key_span(t, "heartbeat_ms")),
                format!(
                    "dead_after_ms ({}) must be greater than heartbeat_ms ({})",
                    dead_after.as_millis(),
                    heartbeat.as_millis()
                ),
            );
        }
        let connect_timeout = self.millis(t, &k::CONNECT_TIMEOUT_MS);
        let handshake_timeout = self.millis(t, &k::HANDSHAKE_TIMEOUT_MS);
        let reconnect_min = self.millis(t, &k::RECONNECT_MIN_MS);
        let reconnect_max = self.millis(t, &k::RECONNECT_MAX_MS);
        if reconnect_min > reconnect_max {
            self.err(
                Self::key_span(t, "reconnect_max_ms"),
                "reconnect_max_ms must be at least reconnect_min_ms".into(),
            );
        }
        let shutdown_grace = self.millis(t, &k::SHUTDOWN_GRACE_MS);
        let max_frame_bytes = self.int(t, &k::MAX_FRAME_BYTES) as usize;
        let max_pending_handshakes = self.int(t, &k::MAX_PENDING_HANDSHAKES) as usize;
        let max_imported_members = self.int(t, &k::MAX_IMPORTED_MEMBERS) as usize;
        let worker_threads = self.int(t, &k::WORKER_THREADS) as usize;
        let (cluster, _) = cluster?;
        Some(GatewayConfig {
            cluster,
            name,
            listen,
            heartbeat,
            dead_after,
            connect_timeout,
            handshake_timeout,
            reconnect_min,
            reconnect_max,
            shutdown_grace,
            max_frame_bytes,
            max_pending_handshakes,
            max_imported_members,
            worker_threads,
        })
    }

    pub(super) fn tls(&mut self, t: &dyn TableLike) -> Option<TlsFiles> {
        self.allow(t, &keys::tls::TABLE);
        let cert = self.path(t, "cert", "[tls]");
        let key = self.path(t, "key", "[tls]");
        let ca = self.path(t, "ca", "[tls]");
        let crl = self.path_opt(t, "crl");
        Some(TlsFiles { cert: cert?, key: key?, ca: ca?, crl, route_cas: Vec::new() })
    }

    pub(super) fn metrics(&mut self, t: &dyn TableLike) -> Option<MetricsConfig> {
        self.allow(t, &keys::metrics::TABLE);
        if t.get("listen").is_none() {
            self.err(None, "missing required key \"listen\" in [metrics]".into());
        }
        Some(MetricsConfig { listen: self.socket_addr(t, "listen")? })
    }
}
