//! Peers that must not get in, and bytes that must not hurt: impostors with
//! valid certificates for another cluster, raw clients that stall or send
//! garbage. Each is refused within its deadline, counted, and the gateway's
//! other links stay up.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use support::*;
use wandist::config::{PathAt, TlsFiles};
use wandist::link::handshake::{self, Admission, HandshakeError, Identity, Offer};
use wandist::link::Timeouts;
use wandist::route::Window;
use wandist::tls::Tls;
use wandist::wire::codec;

const T: Timeouts = Timeouts { connect: Duration::from_secs(5), handshake: Duration::from_secs(5) };
const MAX: usize = codec::DEFAULT_MAX_FRAME_BYTES;

/// TLS material for `cert_of`'s certificate, from `certs`.
fn tls_of(certs: &Certs, cert_of: &str) -> Tls {
    let at = |f: String| PathAt { path: certs.path(&f), line: None };
    let files = TlsFiles::new(at(format!("{cert_of}.pem")), at(format!("{cert_of}.key")), at("ca.pem".into()));
    Tls::load(&files, Some(cert_of), Path::new("test")).unwrap()
}

const OFFER: Offer = Offer { links_wanted: 1, recv_window: Window { messages: 1000, bytes: 1 << 20 } };

fn identity(cluster: &str) -> Identity {
    Identity { cluster: cluster.into(), gateway: "impostor".into(), epoch: wandist::wire::Epoch(7) }
}

/// A raw client with `tls` claiming to be `claim`, handshaking with dc1 at `addr`.
async fn claim_to_dc1(
    addr: std::net::SocketAddr,
    tls: &Tls,
    claim: &str,
) -> Result<handshake::Established, HandshakeError> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    handshake::client(tcp, Some(tls), "dc1", identity(claim).hello(OFFER), &T, MAX).await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A server claiming to be dc2 with `tls`, and a dc1 gateway (`tls_table`)
/// dialing it; the server task returns its handshake error, if any.
fn dial_a_fake_dc2(
    rt: &tokio::runtime::Runtime,
    tls: Tls,
    tls_table: &str,
) -> (tokio::task::JoinHandle<Option<HandshakeError>>, Gateway) {
    dial_a_fake(rt, "dc2", tls, tls_table, "")
}

/// A server claiming to be `cluster` with `tls`, and a dc1 gateway
/// (`tls_table`, and `route` in its route to `cluster`) dialing it.
fn dial_a_fake(
    rt: &tokio::runtime::Runtime,
    cluster: &str,
    tls: Tls,
    tls_table: &str,
    route: &str,
) -> (tokio::task::JoinHandle<Option<HandshakeError>>, Gateway) {
    let fake = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let fake_addr = fake.local_addr().unwrap();
    let admit: HashMap<String, Admission> =
        [("dc1".to_string(), Admission { insecure_plaintext: false, offer: OFFER, session: None, standby: false })]
            .into();
    let me = identity(cluster);
    let server = rt.spawn(async move {
        let (tcp, _) = fake.accept().await.unwrap();
        handshake::server(tcp, Some(&tls), &me, &admit, &T, MAX).await.err()
    });
    let dialer = Gateway::start(
        &format!("dc1-dialing-{cluster}"),
        &format!(
            "{}{tls_table}[[route]]\ncluster = \"{cluster}\"\nendpoints = [\"{fake_addr}\"]\n{route}",
            gateway_table("dc1", false)
        ),
    );
    (server, dialer)
}

/// TLS material from two folders: a certificate and key, and the CA trusted.
fn tls_from(cert: &Certs, cluster: &str, ca: &Certs) -> Tls {
    let at = |p: std::path::PathBuf| PathAt { path: p, line: None };
    let files = TlsFiles::new(
        at(cert.path(&format!("{cluster}.pem"))),
        at(cert.path(&format!("{cluster}.key"))),
        at(ca.path("ca.pem")),
    );
    Tls::load(&files, None, Path::new("test")).unwrap()
}

#[test]
fn a_valid_certificate_for_another_cluster_cannot_pose_as_the_peer() {
    let certs = Certs::new(&["dc1", "dc2", "dc3"]);
    let dc1 = Gateway::start("dc1", &accepting("dc1", &certs, "dc2"));
    let rt = runtime();
    let dc3 = tls_of(&certs, "dc3");

    // Accepting side: dc3's certificate, claiming to be dc2.
    let err = rt.block_on(claim_to_dc1(dc1.peer_addr(), &dc3, "dc2")).expect_err("dc1 accepted an impostor");
    assert!(matches!(&err, HandshakeError::Refused(why) if why.contains("does not name cluster \"dc2\"")), "{err}");
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "identity")], |v| v == 1.0);
    let line = dc1.wait_log("refused incoming connection", SOON);
    assert!(line.contains("dc2") && line.contains("does not name"), "{line}");

    // Dialing side: dc1 dials "dc2" and meets a server holding dc3's certificate.
    let (server, dialer) = dial_a_fake_dc2(&rt, dc3, &certs.tls_table("dc1"));
    dialer.wait_metric("wandist_handshake_failures_total", &[("peer", "dc2"), ("reason", "tls")], |v| v >= 1.0);
    let line = dialer.wait_log("cannot establish link", SOON);
    assert!(line.contains("NotValidForName") || line.contains("not valid for"), "{line}");
    let server_err = rt.block_on(server).unwrap().expect("the fake server completed a handshake");
    assert_eq!(server_err.reason(), "tls", "{server_err}");
    assert_eq!(dialer.metric("wandist_link_up", &[("peer", "dc2"), ("role", "primary")]), Some(0.0));
}

#[test]
fn an_expired_certificate_is_refused_on_both_sides() {
    let ours = Certs::new(&["dc1"]);
    // dc2's certificate ended its 30 days of validity yesterday (a gateway
    // will not even start with it, so a raw handshake presents it).
    let expired = Certs { dir: tempfile::tempdir().unwrap() };
    wandist::certs::generate_valid_for(expired.dir.path(), &["dc2".to_string()], -1).unwrap();
    // dc1 trusts both CAs, so expiry is the only thing wrong.
    let bundle = ours.path("bundle.pem");
    let cas = [ours.path("ca.pem"), expired.path("ca.pem")].map(|p| std::fs::read_to_string(p).unwrap());
    std::fs::write(&bundle, cas.concat()).unwrap();
    let at = |p: std::path::PathBuf| PathAt { path: p, line: None };
    let files = TlsFiles::new(at(expired.path("dc2.pem")), at(expired.path("dc2.key")), at(bundle.clone()));
    let dc2 = Tls::load(&files, None, Path::new("test")).unwrap();
    let rt = runtime();

    // Accepting side: dc1 refuses the expired client certificate.
    let dc1 = Gateway::start(
        "dc1",
        &format!("{}{}[[route]]\ncluster = \"dc2\"\n", gateway_table("dc1", true), ours.tls_table_with("dc1", &bundle)),
    );
    let err = rt.block_on(claim_to_dc1(dc1.peer_addr(), &dc2, "dc2")).expect_err("dc1 accepted an expired certificate");
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "tls")], |v| v == 1.0);
    let line = dc1.wait_log("refused incoming connection", SOON);
    assert!(line.contains("certificate expired"), "{line}");
    // (TLS 1.3: the client learns it from dc1's alert, during the hello.)
    assert!(err.to_string().contains("CertificateExpired"), "{err}");

    // Dialing side: dc1 dials a server holding the expired certificate.
    let (server, dialer) = dial_a_fake_dc2(&rt, dc2, &ours.tls_table_with("dc1", &bundle));
    dialer.wait_metric("wandist_handshake_failures_total", &[("peer", "dc2"), ("reason", "tls")], |v| v >= 1.0);
    let line = dialer.wait_log("cannot establish link", SOON);
    assert!(line.contains("certificate expired"), "{line}");
    assert!(rt.block_on(server).unwrap().is_some(), "the fake server completed a handshake");
    for (gw, peer) in [(&dc1, "dc2"), (&dialer, "dc2")] {
        assert_eq!(gw.metric("wandist_link_connects_total", &[("peer", peer)]), Some(0.0), "{}", gw.name);
    }
}

fn expect_cut(mut s: TcpStream, what: &str) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => continue, // e.g. a preamble and goodbye
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return start.elapsed(),
            Err(e) => panic!("{what}: not cut: {e}"),
        }
    }
}

#[test]
fn raw_clients_that_stall_or_send_garbage_are_cut_and_other_links_stay_up() {
    let certs = Certs::new(&["dc1", "dc2", "dc3"]);
    let dc1 = Gateway::start(
        "dc1",
        &format!(
            "{}{}[[route]]\ncluster = \"dc2\"\n[[route]]\ncluster = \"dc3\"\n",
            gateway_table_with("dc1", true, "handshake_timeout_ms = 500\nmax_frame_bytes = 65536\n"),
            certs.tls_table("dc1")
        ),
    );
    let dc2 = Gateway::start("dc2", &dialing("dc2", &certs, "dc1", dc1.peer_addr()));
    dc1.wait_metric("wandist_link_up", &[("peer", "dc2"), ("role", "primary")], |v| v == 1.0);

    // Says nothing at all: cut by the hello deadline (500 ms), not before.
    let silent = TcpStream::connect(dc1.peer_addr()).unwrap();
    let took = expect_cut(silent, "silent client");
    assert!(took >= Duration::from_millis(400), "cut after {took:?}, before its deadline");
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "hello_timeout")], |v| {
        v == 1.0
    });

    // Completes TCP, starts TLS, then stalls: cut by the TLS deadline.
    let mut stalled_tls = TcpStream::connect(dc1.peer_addr()).unwrap();
    stalled_tls.write_all(&[0x16, 0x03, 0x01, 0x00, 0x50]).unwrap();
    expect_cut(stalled_tls, "stalled TLS client");
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "tls_timeout")], |v| {
        v == 1.0
    });

    // Speaks HTTP at a wandist port.
    let mut http = TcpStream::connect(dc1.peer_addr()).unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    expect_cut(http, "HTTP client");
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "bad_magic")], |v| v == 1.0);

    // A future protocol version, and the previous one (version 1 named
    // processes by their pids): refused, with the versions in the log.
    for (n, version) in [(1.0, b"WDST\x00\x63"), (2.0, b"WDST\x00\x01")] {
        let mut other = TcpStream::connect(dc1.peer_addr()).unwrap();
        other.write_all(version).unwrap();
        expect_cut(other, "wrong version");
        dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "version")], |v| v == n);
    }
    let line = dc1.wait_log("peer speaks protocol version 99", SOON);
    assert!(line.contains("this gateway speaks 2"), "{line}");

    // A hello claiming 4 GiB.
    let mut oversize = TcpStream::connect(dc1.peer_addr()).unwrap();
    oversize.write_all(&codec::preamble()).unwrap();
    oversize.write_all(&u32::MAX.to_be_bytes()).unwrap();
    expect_cut(oversize, "oversize hello");
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "oversize")], |v| v == 1.0);

    // A frame cut short by EOF.
    let mut short = TcpStream::connect(dc1.peer_addr()).unwrap();
    short.write_all(&codec::preamble()).unwrap();
    short.write_all(&[0, 0, 0, 40, 1, 2, 3]).unwrap();
    short.shutdown(std::net::Shutdown::Write).unwrap();
    expect_cut(short, "truncated hello");
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "truncated")], |v| v == 1.0);

    // An authenticated peer (dc3) whose running link then sends garbage, and
    // another that sends a frame over max_frame_bytes: each link is closed
    // and the frame counted.
    let rt = runtime();
    let dc3 = tls_of(&certs, "dc3");
    // Also `Packed` frames (lz4-v1 and zstd-v1, which every gateway
    // announces): ones claiming a huge size (refused before
    // decompressing), ones holding a control frame, and a zstd bomb (a few
    // bytes that would become 4 MiB, claiming 1,000).
    use wandist::wire::packing::{Codec, Packing};
    let packed = |packing: Packing, raw_len: u32, inner: &[u8]| {
        let mut out = bytes::BytesMut::new();
        codec::encode(&wandist::wire::Header::Packed { packing, raw_len }, inner, 1 << 20, &mut out).unwrap();
        out.to_vec()
    };
    let mut resync = bytes::BytesMut::new();
    codec::encode(&wandist::wire::Header::Resync, &[], 1 << 20, &mut resync).unwrap();
    let resync_packed = |codec: Codec| {
        let mut out = bytes::BytesMut::new();
        codec::Packer::default().pack(codec, &resync, 1 << 20, &mut out).unwrap();
        out.to_vec()
    };
    let bomb = zstd::bulk::compress(&vec![0u8; 4 << 20], 3).unwrap();
    assert!(bomb.len() < 1024);
    for (bytes, reason, count) in [
        (vec![0, 0, 0, 3, 0xff, 0xee, 0xdd], "garbage", 1.0),
        (70_000u32.to_be_bytes().to_vec(), "oversize", 1.0),
        (packed(Packing::Lz4, 1 << 30, b"tiny"), "oversize", 2.0),
        (packed(Packing::Zstd, 1 << 30, b"tiny"), "oversize", 3.0),
        (resync_packed(Codec::Lz4), "garbage", 2.0),
        (resync_packed(Codec::Zstd(1)), "garbage", 3.0),
        (packed(Packing::Zstd, 1000, &bomb), "garbage", 4.0),
    ] {
        let closed = rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut est = claim_to_dc1(dc1.peer_addr(), &dc3, "dc3").await.unwrap();
            est.io.write_all(&bytes).await.unwrap();
            est.io.flush().await.unwrap();
            let mut sink = vec![0u8; 4096];
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match est.io.read(&mut sink).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await
        });
        assert!(closed.is_ok(), "link with {reason} frame was not closed");
        dc1.wait_metric("wandist_frames_rejected_total", &[("peer", "dc3"), ("reason", reason)], |v| v == count);
        dc1.wait_metric("wandist_link_disconnects_total", &[("peer", "dc3"), ("reason", reason)], |v| v == count);
    }

    // Through all of it, the real link never dropped.
    let m = dc1.metrics();
    assert_eq!(metric_value(&m, "wandist_link_up", &[("peer", "dc2"), ("role", "primary")]), Some(1.0));
    assert_eq!(metric_value(&m, "wandist_link_connects_total", &[("peer", "dc2")]), Some(1.0));
    assert_eq!(metric_sum(&m, "wandist_link_disconnects_total", &[("peer", "dc2")]), 0.0);
    assert_eq!(dc2.metric("wandist_link_connects_total", &[("peer", "dc1")]), Some(1.0));
}

#[test]
fn plaintext_is_refused_unless_the_route_allows_it() {
    let certs = Certs::new(&["dc1", "dc2"]);
    let dc1 = Gateway::start(
        "dc1",
        &format!(
            "{}{}[[route]]\ncluster = \"dc2\"\n[[route]]\ncluster = \"lab\"\ninsecure_plaintext = true\n",
            gateway_table("dc1", true),
            certs.tls_table("dc1")
        ),
    );
    dc1.wait_log("route uses insecure_plaintext", SOON);
    // dc2 dials without TLS: its route on dc1 requires TLS.
    let dc2 = Gateway::start(
        "dc2",
        &format!(
            "{}[[route]]\ncluster = \"dc1\"\nendpoints = [\"{}\"]\ninsecure_plaintext = true\n",
            gateway_table("dc2", false),
            dc1.peer_addr()
        ),
    );
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "plaintext_refused")], |v| {
        v >= 1.0
    });
    dc2.wait_metric("wandist_handshake_failures_total", &[("peer", "dc1"), ("reason", "refused_by_peer")], |v| {
        v >= 1.0
    });
    // The lab route allows it.
    let lab = Gateway::start(
        "lab",
        &format!(
            "{}[[route]]\ncluster = \"dc1\"\nendpoints = [\"{}\"]\ninsecure_plaintext = true\n",
            gateway_table("lab", false),
            dc1.peer_addr()
        ),
    );
    lab.wait_metric("wandist_link_up", &[("peer", "dc1"), ("role", "primary")], |v| v == 1.0);
    dc1.wait_metric("wandist_link_up", &[("peer", "lab"), ("role", "primary")], |v| v == 1.0);
    assert!(dc1.wait_log("link up from", SOON).contains("PLAINTEXT"));
}

#[test]
fn a_dialer_never_hangs_on_a_silent_peer_or_proxy() {
    let certs = Certs::new(&["dc1", "dc2", "dc3", "dc4"]);
    let rt = runtime();
    // Accept TCP and say nothing, forever (held open until the test ends).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    // Complete TLS as dc2, then say nothing.
    let tls_then_silent = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let tls_addr = tls_then_silent.local_addr().unwrap();
    let dc2 = tls_of(&certs, "dc2");
    rt.spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((tcp, _)) = tls_then_silent.accept().await else {
                return;
            };
            if let Ok(s) = tokio_rustls::TlsAcceptor::from(dc2.server.clone()).accept(tcp).await {
                held.push(s);
            }
        }
    });
    let dc1 = Gateway::start(
        "dc1",
        &format!(
            "{}{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{tls_addr}\"]\n\
         [[route]]\ncluster = \"dc3\"\nendpoints = [\"{silent_addr}\"]\n\
         [[route]]\ncluster = \"dc4\"\nendpoints = [\"10.9.9.9:4370\"]\nsocks5 = \"{silent_addr}\"\n",
            gateway_table_with("dc1", false, "handshake_timeout_ms = 300\n"),
            certs.tls_table("dc1")
        ),
    );
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "dc2"), ("reason", "hello_timeout")], |v| v >= 1.0);
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "dc3"), ("reason", "tls_timeout")], |v| v >= 1.0);
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "dc4"), ("reason", "socks_timeout")], |v| v >= 1.0);
    let line = dc1.wait_log("SOCKS5 negotiation timed out after 300ms", SOON);
    assert!(line.contains("dc4"), "{line}");
    drop(silent);
}

/// Before a peer is known, it costs at most one handshake deadline, however
/// it spreads its stalls over TLS and the hello; refusals are counted, and
/// said once per reason per period, not once per connection.
#[test]
fn an_unknown_client_gets_one_deadline_and_refusals_do_not_flood_the_log() {
    let certs = Certs::new(&["dc1", "dc3"]);
    let dc1 = Gateway::start(
        "dc1",
        &format!(
            "{}{}[[route]]\ncluster = \"dc3\"\n",
            gateway_table_with("dc1", true, "handshake_timeout_ms = 1000\n"),
            certs.tls_table("dc1")
        ),
    );
    // Waits 700 ms, completes TLS (with a certificate dc1 trusts), then
    // stalls before its hello: cut when the one deadline ends (1 s after
    // connecting), not a fresh one after TLS.
    let rt = runtime();
    let dc3 = tls_of(&certs, "dc3");
    let addr = dc1.peer_addr();
    let cut_after = rt.block_on(async move {
        use tokio::io::AsyncReadExt;
        let start = Instant::now();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let name = wandist::tls::server_name("dc1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(dc3.client.clone()).connect(name, tcp).await.unwrap();
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
                Ok(Ok(_)) => {}
                Err(_) => panic!("not cut within 10 s"),
            }
        }
    });
    assert!(cut_after >= Duration::from_millis(900), "cut after {cut_after:?}, before the deadline");
    assert!(cut_after < Duration::from_millis(1500), "cut after {cut_after:?}: a second deadline after TLS");
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "hello_timeout")], |v| {
        v == 1.0
    });

    // Thirty clients speaking HTTP: thirty refusals counted, one line said.
    for _ in 0..30 {
        let mut http = TcpStream::connect(dc1.peer_addr()).unwrap();
        http.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        expect_cut(http, "HTTP client");
    }
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "bad_magic")], |v| v == 30.0);
    let lines =
        dc1.logs().iter().filter(|l| l.contains("refused incoming connection") && l.contains("bad_magic")).count();
    assert!((1..=2).contains(&lines), "{lines} log lines for 30 refusals");
}

/// The metrics endpoint serves at most 64 connections at once; more are
/// closed at once and counted, and an idle one is closed after 2 s.
#[test]
fn the_metrics_endpoint_caps_its_connections() {
    let certs = Certs::new(&["dc1", "dc2"]);
    let dc1 = Gateway::start("dc1", &accepting("dc1", &certs, "dc2"));
    let idle: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(dc1.metrics_addr).unwrap()).collect();
    // (each accepted and waiting for a request)
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..10 {
        let extra = TcpStream::connect(dc1.metrics_addr).unwrap();
        let took = expect_cut(extra, "a connection over the cap");
        assert!(took < Duration::from_secs(1), "over the cap, yet held {took:?}");
    }
    // The idle ones are closed by the read deadline.
    for s in idle {
        let took = expect_cut(s, "an idle metrics connection");
        assert!(took < Duration::from_secs(5), "idle for {took:?}");
    }
    let refused = dc1.wait_metric("wandist_metrics_connections_refused_total", &[], |v| v >= 10.0);
    assert!(refused < 20.0, "{refused}");
}

/// A partner's own CA (a route's `ca`) vouches for that partner only, and
/// the partner is that route only through it: its CA cannot mint a
/// certificate for another peer, and ours cannot stand in for its. Both
/// directions, against the real binary.
#[test]
fn a_partner_ca_vouches_for_its_own_route_only() {
    let ours = Certs::new(&["dc1", "dc2", "dc3"]);
    let partner = Certs::new(&["dc3", "dc2"]);
    let route3 = format!("ca = {:?}\n", partner.path("ca.pem"));
    let dc1 = Gateway::start(
        "dc1",
        &format!(
            "{}{}[[route]]\ncluster = \"dc2\"\n[[route]]\ncluster = \"dc3\"\n{route3}",
            gateway_table("dc1", true),
            ours.tls_table("dc1")
        ),
    );
    let rt = runtime();

    // Accepting side. The partner's dc3 gets in.
    rt.block_on(claim_to_dc1(dc1.peer_addr(), &tls_from(&partner, "dc3", &ours), "dc3"))
        .expect("dc1 refused the partner's own certificate");
    dc1.wait_metric("wandist_link_connects_total", &[("peer", "dc3")], |v| v >= 1.0);
    // A dc2 certificate from the partner's CA, and a dc3 one from ours: both
    // pass the TLS handshake (each CA is trusted for someone) and are
    // refused once the hello says who they claim to be.
    for (certs, claim) in [(&partner, "dc2"), (&ours, "dc3")] {
        let err = rt
            .block_on(claim_to_dc1(dc1.peer_addr(), &tls_from(certs, claim, &ours), claim))
            .err()
            .unwrap_or_else(|| panic!("dc1 took a {claim} certificate from the wrong CA"));
        assert!(
            matches!(&err, HandshakeError::Refused(why) if why.contains(&format!("not valid for cluster \"{claim}\""))),
            "{err}"
        );
    }
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "identity")], |v| v == 2.0);
    assert_eq!(dc1.metric("wandist_link_connects_total", &[("peer", "dc2")]), Some(0.0));

    // Dialing side: dc1 dials dc3 and meets our CA's dc3 certificate...
    let (server, dialer) = dial_a_fake(&rt, "dc3", tls_from(&ours, "dc3", &ours), &ours.tls_table("dc1"), &route3);
    dialer.wait_metric("wandist_handshake_failures_total", &[("peer", "dc3"), ("reason", "tls")], |v| v >= 1.0);
    assert!(rt.block_on(server).unwrap().is_some(), "the fake dc3 completed a handshake");
    assert_eq!(dialer.metric("wandist_link_connects_total", &[("peer", "dc3")]), Some(0.0));
    drop(dialer);
    // ... and the partner's: that one is dc3.
    let (server, dialer) = dial_a_fake(&rt, "dc3", tls_from(&partner, "dc3", &ours), &ours.tls_table("dc1"), &route3);
    if let Some(e) = rt.block_on(server).unwrap() {
        panic!("dc1 refused to dial the partner's dc3: {e}");
    }
    dialer.wait_metric("wandist_link_connects_total", &[("peer", "dc3")], |v| v >= 1.0);
}

/// `wandist certs --revoke` and `tls.crl`: the revoked certificate is
/// refused in both directions, its replacement works.
#[test]
fn a_revoked_certificate_is_refused_on_both_sides_and_its_replacement_works() {
    let certs = Certs::new(&["dc1", "dc2"]);
    for ext in ["pem", "key"] {
        std::fs::copy(certs.path(&format!("dc2.{ext}")), certs.path(&format!("old-dc2.{ext}"))).unwrap();
    }
    let out = std::process::Command::new(BIN)
        .args(["certs", "--revoke", "--out"])
        .arg(certs.dir.path())
        .arg("dc2")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("crl.pem"));
    let old = || {
        let at = |f: &str| PathAt { path: certs.path(f), line: None };
        Tls::load(&TlsFiles::new(at("old-dc2.pem"), at("old-dc2.key"), at("ca.pem")), None, Path::new("t")).unwrap()
    };
    let tls_table = format!("{}crl = {:?}\n", certs.tls_table("dc1"), certs.path("crl.pem"));
    let dc1 =
        Gateway::start("dc1", &format!("{}{tls_table}[[route]]\ncluster = \"dc2\"\n", gateway_table("dc1", true)));
    let rt = runtime();

    // Accepting side.
    rt.block_on(claim_to_dc1(dc1.peer_addr(), &old(), "dc2")).expect_err("dc1 accepted a revoked certificate");
    dc1.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "tls")], |v| v == 1.0);
    let line = dc1.wait_log("refused incoming connection", SOON);
    assert!(line.contains("Revoked"), "{line}");
    rt.block_on(claim_to_dc1(dc1.peer_addr(), &tls_from(&certs, "dc2", &certs), "dc2"))
        .expect("dc1 refused dc2's new certificate");
    dc1.wait_metric("wandist_link_connects_total", &[("peer", "dc2")], |v| v >= 1.0);

    // Dialing side.
    let (server, dialer) = dial_a_fake_dc2(&rt, old(), &tls_table);
    dialer.wait_metric("wandist_handshake_failures_total", &[("peer", "dc2"), ("reason", "tls")], |v| v >= 1.0);
    let line = dialer.wait_log("cannot establish link", SOON);
    assert!(line.contains("Revoked"), "{line}");
    assert!(rt.block_on(server).unwrap().is_some(), "the revoked dc2 completed a handshake");
    drop(dialer);
    let (server, dialer) = dial_a_fake_dc2(&rt, tls_from(&certs, "dc2", &certs), &tls_table);
    if let Some(e) = rt.block_on(server).unwrap() {
        panic!("dc1 refused to dial dc2's new certificate: {e}");
    }
    dialer.wait_metric("wandist_link_connects_total", &[("peer", "dc2")], |v| v >= 1.0);
}
