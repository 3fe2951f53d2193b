//! End to end: real `wandist` processes on loopback forming mutual-TLS
//! links, refusing impostors, going through a real SOCKS5 server.

mod support;

use std::time::Duration;

use support::forward::Forwarder;
use support::*;

const UP: &str = "wandist_link_up";

fn primary(peer: &str) -> [(&'static str, String); 2] {
    [("peer", peer.to_string()), ("role", "primary".to_string())]
}

fn labels<'a>(l: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    l.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn two_gateways_form_a_mutual_tls_link_when_only_one_can_dial() {
    let certs = Certs::new(&["dc1", "dc2"]);
    // dc1 only accepts (endpoints = []): the route works though only dc2 can reach dc1.
    let dc1 = Gateway::start(
        "dc1",
        &format!(
            "{}{}[[route]]\ncluster = \"dc2\"\nendpoints = []\n",
            gateway_table("dc1", true),
            certs.tls_table("dc1")
        ),
    );
    let dc2 = Gateway::start("dc2", &dialing("dc2", &certs, "dc1", dc1.peer_addr()));
    dc1.wait_metric(UP, &labels(&primary("dc2")), |v| v == 1.0);
    dc2.wait_metric(UP, &labels(&primary("dc1")), |v| v == 1.0);
    // Heartbeats flow both ways over the one link: both sides measure RTT.
    dc1.wait_metric("wandist_link_rtt_seconds_count", &[("peer", "dc2")], |v| v >= 3.0);
    dc2.wait_metric("wandist_link_rtt_seconds_count", &[("peer", "dc1")], |v| v >= 3.0);
    assert_eq!(dc2.metric("wandist_link_connects_total", &[("peer", "dc1")]), Some(1.0));
    assert!(dc1.metric("wandist_bytes_received_total", &[("peer", "dc2")]).unwrap() > 0.0);
    assert!(dc2.metric("wandist_bytes_sent_total", &[("peer", "dc1")]).unwrap() > 0.0);
    let up = dc1.wait_log("link up from", SOON);
    assert!(up.contains("mutual TLS") && up.contains("gw-dc2"), "{up}");
}

#[test]
fn when_both_sides_dial_at_once_they_keep_one_link() {
    let certs = Certs::new(&["dc1", "dc2"]);
    // Each side reaches the other through a forwarder that holds its bytes
    // until both dials are in flight, so the two handshakes finish together.
    let to_dc2 = Forwarder::start(None);
    let to_dc1 = Forwarder::start(None);
    to_dc2.blackhole(true);
    to_dc1.blackhole(true);
    let slow_hello = "handshake_timeout_ms = 20000\n";
    let dc1 = Gateway::start(
        "dc1",
        &format!(
            "{}{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n",
            gateway_table_with("dc1", true, slow_hello),
            certs.tls_table("dc1"),
            to_dc2.addr
        ),
    );
    let dc2 = Gateway::start(
        "dc2",
        &format!(
            "{}{}[[route]]\ncluster = \"dc1\"\nendpoints = [\"{}\"]\n",
            gateway_table_with("dc2", true, slow_hello),
            certs.tls_table("dc2"),
            to_dc1.addr
        ),
    );
    to_dc2.set_target(dc2.peer_addr());
    to_dc1.set_target(dc1.peer_addr());
    wait_for("both dials to be in flight", SOON, || (to_dc2.forwarded() > 0 && to_dc1.forwarded() > 0).then_some(()));
    to_dc2.blackhole(false);
    to_dc1.blackhole(false);

    // Both handshakes complete; dc1 (whose name sorts first) trims the surplus.
    dc1.wait_metric("wandist_link_connects_total", &[("peer", "dc2")], |v| v == 2.0);
    dc1.wait_metric("wandist_link_disconnects_total", &[("peer", "dc2"), ("reason", "surplus")], |v| v == 1.0);
    dc2.wait_metric("wandist_link_disconnects_total", &[("peer", "dc1"), ("reason", "goodbye")], |v| v == 1.0);
    for (gw, peer) in [(&dc1, "dc2"), (&dc2, "dc1")] {
        wait_for("one link per side", SOON, || {
            let m = gw.metrics();
            let p = metric_value(&m, UP, &[("peer", peer), ("role", "primary")])?;
            let s = metric_value(&m, UP, &[("peer", peer), ("role", "standby")])?;
            let opened = metric_sum(&m, "wandist_link_connects_total", &[("peer", peer)]);
            let closed = metric_sum(&m, "wandist_link_disconnects_total", &[("peer", peer)]);
            (p == 1.0 && s == 0.0 && opened - closed == 1.0).then_some(())
        });
    }
    // The kept link carries heartbeats both ways.
    let before = dc2.metric("wandist_link_rtt_seconds_count", &[("peer", "dc1")]).unwrap_or(0.0);
    dc2.wait_metric("wandist_link_rtt_seconds_count", &[("peer", "dc1")], |v| v >= before + 2.0);
}

#[test]
fn a_certificate_from_another_ca_is_refused_on_both_sides() {
    let ours = Certs::new(&["dc1"]);
    let theirs = Certs::new(&["dc2"]); // a different CA
    let dc1 = Gateway::start(
        "dc1",
        &format!(
            "{}{}[[route]]\ncluster = \"dc2\"\nendpoints = []\n",
            gateway_table("dc1", true),
            ours.tls_table("dc1")
        ),
    );
    // dc2 trusts its own CA and holds a certificate dc1's CA never signed.
    let dc2 = Gateway::start(
        "dc2",
        &format!(
            "{}{}[[route]]\ncluster = \"dc1\"\nendpoints = [\"{}\"]\n",
            gateway_table("dc2", true),
            theirs.tls_table("dc2"),
            dc1.peer_addr()
        ),
    );
    // The dialer refuses dc1's certificate (unknown issuer)...
    dc2.wait_metric("wandist_handshake_failures_total", &[("peer", "dc1"), ("reason", "tls")], |v| v >= 1.0);
    let line = dc2.wait_log("cannot establish link", SOON);
    assert!(line.contains("UnknownIssuer") || line.contains("certificate"), "{line}");
    // ...and the acceptor refuses dc2's, counted under peer="unknown".
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "tls")], |v| v >= 1.0);
    dc1.wait_log("refused incoming connection", SOON);

    // The other direction: dc1 dials dc2 and refuses dc2's certificate.
    let dc1b = Gateway::start(
        "dc1b",
        &format!(
            "{}{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n",
            gateway_table("dc1", false),
            ours.tls_table("dc1"),
            dc2.peer_addr()
        ),
    );
    dc1b.wait_metric("wandist_handshake_failures_total", &[("peer", "dc2"), ("reason", "tls")], |v| v >= 1.0);
    // Nothing came up, and every gateway is still serving.
    for (gw, peer) in [(&dc1, "dc2"), (&dc2, "dc1"), (&dc1b, "dc2")] {
        assert_eq!(gw.metric(UP, &[("peer", peer), ("role", "primary")]), Some(0.0), "{}", gw.name);
        assert_eq!(gw.metric("wandist_link_connects_total", &[("peer", peer)]), Some(0.0), "{}", gw.name);
    }
}

#[test]
fn a_route_through_a_real_socks5_proxy_survives_the_proxy_restarting() {
    let certs = Certs::new(&["dc1", "dc2"]);
    let mut proxy = Socks5Server::start(Some(("wan", "s3cret-pw")));
    let dc1 = Gateway::start("dc1", &accepting("dc1", &certs, "dc2"));
    let dc2 = Gateway::start("dc2", &format!(
        "{}{}[[route]]\ncluster = \"dc1\"\nendpoints = [\"{}\"]\nsocks5 = \"{}\"\nsocks5_username = \"wan\"\nsocks5_password = \"s3cret-pw\"\n",
        gateway_table("dc2", false), certs.tls_table("dc2"), dc1.peer_addr(), proxy.addr
    ));
    dc2.wait_metric(UP, &labels(&primary("dc1")), |v| v == 1.0);
    dc1.wait_metric(UP, &labels(&primary("dc2")), |v| v == 1.0);
    // TLS ran end to end through the proxy: dc1 saw dc2's certificate.
    let up = dc1.wait_log("link up from", SOON);
    assert!(up.contains("mutual TLS"), "{up}");
    let port = proxy.addr.port();

    proxy.stop();
    dc2.wait_metric(UP, &labels(&primary("dc1")), |v| v == 0.0);
    dc2.wait_metric("wandist_handshake_failures_total", &[("peer", "dc1"), ("reason", "connect")], |v| v >= 1.0);

    let _proxy = Socks5Server::start_on(port, Some(("wan", "s3cret-pw")));
    dc2.wait_metric(UP, &labels(&primary("dc1")), |v| v == 1.0);
    dc1.wait_metric(UP, &labels(&primary("dc2")), |v| v == 1.0);
    assert!(dc2.metric("wandist_link_connects_total", &[("peer", "dc1")]).unwrap() >= 2.0);
    for gw in [&dc1, &dc2] {
        assert!(gw.logs().iter().all(|l| !l.contains("s3cret-pw")), "{} logged the SOCKS password", gw.name);
    }
}

#[test]
fn wrong_socks5_credentials_are_a_clear_handshake_failure() {
    let certs = Certs::new(&["dc1", "dc2"]);
    let proxy = Socks5Server::start(Some(("wan", "right")));
    let dc1 = Gateway::start("dc1", &accepting("dc1", &certs, "dc2"));
    let dc2 = Gateway::start("dc2", &format!(
        "{}{}[[route]]\ncluster = \"dc1\"\nendpoints = [\"{}\"]\nsocks5 = \"{}\"\nsocks5_username = \"wan\"\nsocks5_password = \"wrong\"\n",
        gateway_table("dc2", false), certs.tls_table("dc2"), dc1.peer_addr(), proxy.addr
    ));
    dc2.wait_metric("wandist_handshake_failures_total", &[("peer", "dc1"), ("reason", "socks")], |v| v >= 1.0);
    let line = dc2.wait_log("SOCKS5 proxy", SOON);
    assert!(!line.contains("wrong"), "password leaked: {line}");
    assert_eq!(dc2.metric(UP, &labels(&primary("dc1"))), Some(0.0));
}

#[test]
fn a_socks5_proxy_that_refuses_the_connection_is_a_clear_handshake_failure() {
    let certs = Certs::new(&["dc3"]);
    let proxy = Socks5Server::start(None);
    // Nothing listens where the proxy is asked to connect: a port we bound and released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dc3 = Gateway::start(
        "dc3",
        &format!(
            "{}{}[[route]]\ncluster = \"dc1\"\nendpoints = [\"{closed}\"]\nsocks5 = \"{}\"\n",
            gateway_table("dc3", false),
            certs.tls_table("dc3"),
            proxy.addr
        ),
    );
    dc3.wait_metric("wandist_handshake_failures_total", &[("peer", "dc1"), ("reason", "socks")], |v| v >= 2.0);
    let line = dc3.wait_log("SOCKS5 proxy", SOON);
    assert!(line.contains("refused") || line.contains("unreachable") || line.contains("failure"), "{line}");
    assert_eq!(dc3.metric(UP, &labels(&primary("dc1"))), Some(0.0));
    assert_eq!(dc3.metric("wandist_link_connects_total", &[("peer", "dc1")]), Some(0.0));
}

#[test]
fn sigterm_drains_and_exits_zero_and_the_peer_hears_goodbye() {
    let certs = Certs::new(&["dc1", "dc2"]);
    let dc1 = Gateway::start("dc1", &accepting("dc1", &certs, "dc2"));
    let mut dc2 = Gateway::start("dc2", &dialing("dc2", &certs, "dc1", dc1.peer_addr()));
    dc1.wait_metric(UP, &labels(&primary("dc2")), |v| v == 1.0);
    dc2.signal("TERM");
    // shutdown_grace_ms = 3000 in FAST; allow start-up noise on top.
    let status = dc2.wait_exit(Duration::from_secs(8)).expect("wandist did not exit within the grace period");
    assert!(status.success(), "exit status {status:?}");
    dc2.wait_log("stopped", SOON);
    dc1.wait_metric("wandist_link_disconnects_total", &[("peer", "dc2"), ("reason", "goodbye")], |v| v == 1.0);
    dc1.wait_metric(UP, &labels(&primary("dc2")), |v| v == 0.0);
}

#[test]
fn a_blackholed_link_is_declared_dead_and_replaced() {
    let certs = Certs::new(&["dc1", "dc2"]);
    let dc1 = Gateway::start("dc1", &accepting("dc1", &certs, "dc2"));
    let path = Forwarder::start(Some(dc1.peer_addr()));
    let dc2 = Gateway::start("dc2", &dialing("dc2", &certs, "dc1", path.addr));
    dc2.wait_metric(UP, &labels(&primary("dc1")), |v| v == 1.0);
    // Stop all bytes without closing anything: only heartbeats can tell.
    path.blackhole(true);
    dc2.wait_metric("wandist_link_disconnects_total", &[("peer", "dc1"), ("reason", "dead")], |v| v == 1.0);
    dc1.wait_metric("wandist_link_disconnects_total", &[("peer", "dc2"), ("reason", "dead")], |v| v == 1.0);
    let down = dc2.wait_log("link down: dead", SOON);
    assert!(down.contains("nothing received for 1.5s"), "{down}");
    path.blackhole(false);
    dc2.wait_metric("wandist_link_connects_total", &[("peer", "dc1")], |v| v == 2.0);
    dc2.wait_metric(UP, &labels(&primary("dc1")), |v| v == 1.0);
}

#[test]
fn a_flapping_peer_is_retried_with_backoff_not_in_a_spin() {
    let certs = Certs::new(&["dc1", "dc2"]);
    // Accepts TCP and closes at once, forever.
    let flapping = Forwarder::start(None);
    flapping.refuse(true);
    let started = std::time::Instant::now();
    let dc2 = Gateway::start("dc2", &dialing("dc2", &certs, "dc1", flapping.addr));
    dc2.wait_metric("wandist_handshake_failures_total", &[("peer", "dc1")], |v| v >= 6.0);
    // reconnect_min_ms = 50, doubling, capped at 400, each delay at least
    // half its ceiling: six failures take at least 25+50+100+200+200 ms.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(575), "6 attempts in {took:?}: no backoff");
    let attempts = flapping.accepted();
    assert!(attempts <= 6 + 2, "{attempts} connection attempts for 6 failures");
}
