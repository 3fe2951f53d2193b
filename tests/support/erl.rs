//! Real Erlang nodes for tests: the library's driver (also used by `wandist demo`).

#[allow(unused_imports)]
pub use wandist::demo::erl::{Epmd, Erl};

/// A private EPMD; tests need `erl` (apt-get install -y erlang-nox; .ci/run does).
pub fn epmd() -> Epmd {
    assert!(wandist::demo::erl::available(), "erl is not installed: apt-get install -y erlang-nox (.ci/run does)");
    Epmd::start().expect("cannot start epmd")
}

/// A node's distribution port, from the test's EPMD.
pub async fn dist_port(epmd: &Epmd, node: &str) -> u16 {
    wandist::erlang::dist::port_please_at(node, epmd.port, std::time::Duration::from_secs(5)).await.unwrap()
}

/// The `[erlang]` table of a gateway named `node` joining `nodes` (at
/// their ports, from `epmd`), mirroring the scope `wan`.
pub async fn erl_table(epmd: &Epmd, node: &str, cookie: &str, nodes: &[&Erl]) -> String {
    let mut entries = Vec::new();
    for n in nodes {
        entries.push(format!("{{ name = \"{}\", port = {} }}", n.name, dist_port(epmd, &n.name).await));
    }
    format!("[erlang]\nnode = \"{node}\"\ncookie = \"{cookie}\"\nscope = \"wan\"\nnodes = [{}]\n", entries.join(", "))
}

/// A tag unique to this test run, for node names.
pub fn tag() -> String {
    format!("{}_{}", std::process::id(), fastrand::u32(..))
}

/// A node `{name}_{tag}` with the cookie, running the pg scope `wan`.
pub fn pg_node(name: &str, t: &str, cookie: &str, epmd: &Epmd) -> Erl {
    let mut n = Erl::start(&format!("{name}_{t}"), cookie, epmd);
    assert_eq!(n.eval("{ok, _} = pg:start(wan), ok."), "ok");
    n
}

/// An `[erlang]` table: the gateway node `node`, the cookie, these nodes (found through EPMD).
pub fn erlang_table(node: &str, cookie: &str, nodes: &[&Erl]) -> String {
    let list: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.name)).collect();
    format!("[erlang]\nnode = \"{node}\"\ncookie = \"{cookie}\"\nnodes = [{}]\n", list.join(", "))
}

/// Erlang that joins `svc` in scope `wan` with a process answering
/// `{ping, From}` with `{pong, node()}` (it is bound to `P`).
pub const JOIN_PINGER: &str =
    "P = spawn(fun L() -> receive {ping, F} -> F ! {pong, node()}, L() end end), pg:join(wan, svc, P).";

/// dc2's gateway, accepting dc1, whose Erlang side is `b1` (cookie_b) as the
/// node `wgw2_{t}@127.0.0.1`; found through `epmd`.
pub fn dc2_gateway(certs: &super::Certs, t: &str, b1: &Erl, epmd: &Epmd) -> super::Gateway {
    let erlang = erlang_table(&format!("wgw2_{t}@127.0.0.1"), "cookie_b", &[b1]);
    super::Gateway::start_with_env(
        "gw-dc2",
        &format!("{}{erlang}", super::accepting("dc2", certs, "dc1")),
        &[("ERL_EPMD_PORT", epmd.port.to_string())],
    )
}
