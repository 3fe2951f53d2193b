//! Readiness and status as an operator sees them: `/readyz` flipping as
//! the Erlang side and a route come and go, `/status` and `wandist status`
//! naming the primary endpoint, the nodes and the groups.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use support::erl::{epmd, erlang_table, tag, Erl, JOIN_PINGER};
use support::*;

/// GET `path`: (status code, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.split_whitespace().nth(1).unwrap().parse().unwrap(), body.to_string())
}

fn readyz(gw: &Gateway) -> (u16, serde_json::Value) {
    let (code, body) = get(gw.metrics_addr, "/readyz");
    (code, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")))
}

fn wait_ready(gw: &Gateway, code: u16) -> serde_json::Value {
    wait_for(&format!("{}: /readyz {code}", gw.name), SOON, || {
        let (c, v) = readyz(gw);
        (c == code).then_some(v)
    })
}

#[test]
fn readyz_flips_with_the_erlang_side_and_the_route_and_status_names_what_is_where() {
    let t = tag();
    let epmd = epmd();
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    // a1 does not run the scope yet.
    let mut a1 = Erl::start(&format!("a1_{t}"), "cookie_a", &epmd);
    let mut b1 = Erl::start(&format!("b1_{t}"), "cookie_b", &epmd);
    assert_eq!(b1.eval("{ok, _} = pg:start(wan), ok."), "ok");
    assert_eq!(b1.eval(JOIN_PINGER), "ok");
    let certs = Certs::new(&["dc1", "dc2"]);
    let gw1 = Gateway::start_with_env(
        "gw-dc1",
        &format!(
            "{}{}",
            accepting("dc1", &certs, "dc2"),
            erlang_table(&format!("wgw1_{t}@127.0.0.1"), "cookie_a", &[&a1])
        ),
        &env,
    );
    // Not ready: the route is down, and a1 does not answer for the scope.
    let v = wait_ready(&gw1, 503);
    let reasons = v["reasons"].to_string();
    assert!(reasons.contains("route to dc2 is down"), "{reasons}");
    let v = wait_for("the scope named", SOON, || {
        let (_, v) = readyz(&gw1);
        v["reasons"].to_string().contains("does not answer for the pg scope wan").then_some(v)
    });
    assert!(v["reasons"].to_string().contains(&a1.name), "{v}");
    assert!(gw1.find_log("gateway ready").is_none(), "said ready while not");
    // `wandist health`: not ready (exit 1, the reasons said), but alive.
    let health = |gw: &Gateway, extra: &[&str]| {
        let out = Command::new(BIN)
            .args(["health", "--url"])
            .arg(format!("http://{}", gw.metrics_addr))
            .args(extra)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, err) = health(&gw1, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("503") && err.contains("route to dc2 is down"), "{err}");
    assert_eq!(health(&gw1, &["--live"]).0, Some(0));
    assert_eq!(a1.eval("{ok, _} = pg:start(wan), ok."), "ok");

    // dc2 dials dc1: first an endpoint where nobody listens, then dc1.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let gw2 = Gateway::start_with_env(
        "gw-dc2",
        &format!(
            "{}{}[[route]]\ncluster = \"dc1\"\nendpoints = [\"{dead}\", \"{}\"]\n{}",
            gateway_table("dc2", false),
            certs.tls_table("dc2"),
            gw1.peer_addr(),
            erlang_table(&format!("wgw2_{t}@127.0.0.1"), "cookie_b", &[&b1])
        ),
        &env,
    );
    let v = wait_ready(&gw1, 200);
    assert_eq!(v["ready"], true);
    gw1.wait_log("gateway ready", SOON);
    assert_eq!(health(&gw1, &[]).0, Some(0));
    wait_ready(&gw2, 200);
    a1.eval_until("length(pg:get_members(wan, svc)).", |v| v == "1");

    // /status on dc2: the primary link is to the second endpoint, dc1's.
    let status: serde_json::Value = wait_for("dc2's status with its imported group", SOON, || {
        let (code, body) = get(gw1.metrics_addr, "/status");
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        (v["routes"][0]["members_imported"] == 1).then_some(v)
    });
    let route = &status["routes"][0];
    assert_eq!(route["peer"], "dc2");
    assert_eq!(route["up"], true);
    assert_eq!(route["peer_gateway"], "gw-dc2");
    assert_eq!(route["imported"][0]["group"], "svc");
    assert_eq!(route["imported"][0]["members"], 1);
    let nodes = &status["erlang"]["nodes"];
    assert_eq!(nodes[0]["name"], a1.name.as_str());
    assert_eq!(nodes[0]["up"], true);
    assert_eq!(nodes[0]["scopes"][0], "wan");
    let (_, body) = get(gw2.metrics_addr, "/status");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let links = v["routes"][0]["links"].as_array().unwrap().clone();
    let primary: Vec<_> = links.iter().filter(|l| l["role"] == "primary").collect();
    assert_eq!(primary.len(), 1, "{links:?}");
    assert_eq!(primary[0]["endpoint"], gw1.peer_addr().to_string());
    assert!(primary[0]["rtt_ms"].is_number() || primary[0]["rtt_ms"].is_null());

    // `wandist status` prints it, and exits 0 while ready.
    let out = Command::new(BIN).args(["status", "--url"]).arg(format!("http://{}", gw2.metrics_addr)).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("\nready\n"), "{text}");
    assert!(text.contains(&format!("primary  {}", gw1.peer_addr())), "{text}");
    assert!(text.contains(&b1.name), "{text}");
    assert!(text.contains("wan:svc 1"), "{text}");

    // dc2 goes: dc1 is not ready again, and `wandist status` says why (exit 1).
    drop(gw2);
    let v = wait_ready(&gw1, 503);
    assert!(v["reasons"].to_string().contains("route to dc2 is down"), "{v}");
    let out = Command::new(BIN).args(["status", "--url"]).arg(format!("http://{}", gw1.metrics_addr)).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("NOT READY:\n  - route to dc2 is down"), "{text}");
}
