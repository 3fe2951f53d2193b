//! `wandist demo`: two Erlang clusters on loopback joined by two gateways,
//! shown working in a short report. Starts its own EPMD, three `erl` nodes
//! (dc1: a1, a2; dc2: b1), dev certificates and two gateways with a primary
//! and a standby link (the primary through a forwarder it can cut), and
//! stops every process it started.

pub mod erl;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use self::erl::{Epmd, Erl};
use crate::gateway::{self, Running};
use crate::metrics::Metrics;

/// A loopback TCP forwarder whose connections the demo can cut.
struct Forwarder {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Forwarder {
    async fn start(target: SocketAddr) -> std::io::Result<Forwarder> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let list = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                list.lock().await.push(task);
            }
        });
        Ok(Forwarder { addr, conns, accept })
    }

    /// Closes every connection through it (new ones still pass).
    async fn cut(&self) {
        for t in self.conns.lock().await.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn metric(m: &Metrics, name: &str, labels: &str) -> f64 {
    m.render()
        .lines()
        .find(|l| l.starts_with(name) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

async fn gateway(dir: &Path, name: &str, text: String) -> Result<Running, String> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    let prepared =
        gateway::prepare(&path).map_err(|p| p.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))?;
    crate::app::start(prepared, Metrics::new()).await.map_err(|e| e.to_string())
}

async fn dist_port(epmd: &Epmd, node: &str) -> Result<u16, String> {
    crate::erlang::dist::port_please_at(node, epmd.port, Duration::from_secs(5)).await.map_err(|e| e.to_string())
}

/// Runs the demo; returns whether every step worked.
pub async fn run(messages: u32) -> Result<bool, String> {
    if !erl::available() {
        return Err(
            "`erl` was not found. Install Erlang/OTP (Debian/Ubuntu: apt-get install -y erlang-nox) and run again."
                .into(),
        );
    }
    let dir = tempfile_dir()?;
    println!("wandist demo — two Erlang clusters that never connect to each other, bridged by two gateways\n");
    crate::certs::generate(&dir.join("certs"), &["dc1".into(), "dc2".into()]).map_err(|e| e.to_string())?;
    let epmd = Epmd::start().map_err(|e| format!("cannot start epmd: {e}"))?;
    let tag = std::process::id();
    let (mut a1, mut a2, mut b1) = tokio::task::block_in_place(|| {
        (
            Erl::start(&format!("a1_{tag}"), "demo_cookie_dc1", &epmd),
            Erl::start(&format!("a2_{tag}"), "demo_cookie_dc1", &epmd),
            Erl::start(&format!("b1_{tag}"), "demo_cookie_dc2", &epmd),
        )
    });
    tokio::task::block_in_place(|| {
        for n in [&mut a1, &mut a2, &mut b1] {
            n.eval("{ok, _} = pg:start(wan), ok.");
        }
        a2.eval(&format!("net_kernel:connect_node('{}').", a1.name));
        // dc2 runs an echo server and a sink that checks order, both in pg.
        b1.eval(
            "Echo = spawn(fun E() -> receive {'$gen_call', From, Req} -> gen:reply(From, {echo, Req, node()}), E() end end), \
             register(echo, Echo), pg:join(wan, echo, Echo).",
        );
        b1.eval(
            "Sink = spawn(fun() -> (fun S(Next, Dup, Gap) -> receive {seq, I} when I =:= Next -> S(Next + 1, Dup, Gap); \
             {seq, I} when I < Next -> S(Next, Dup + 1, Gap); {seq, _} -> S(Next, Dup, Gap + 1); \
             {get, P} -> P ! {stats, Next - 1, Dup, Gap}, S(Next, Dup, Gap) end end)(1, 0, 0) end), \
             register(sink, Sink), pg:join(wan, sink, Sink).",
        );
        // (REPL bindings persist: a fun keeps its pattern variables fresh per call.)
        b1.eval("Stats = fun() -> sink ! {get, self()}, receive {stats, G1, D1, X1} -> {stats, G1, D1, X1} after 5000 -> timeout end end, ok.");
    });
    println!("  started: epmd on port {}, dc1 = [{}, {}], dc2 = [{}]", epmd.port, a1.name, a2.name, b1.name);

    let tls = |c: &str| format!("[tls]\ncert = \"certs/{c}.pem\"\nkey = \"certs/{c}.key\"\nca = \"certs/ca.pem\"\n");
    let knobs = "heartbeat_ms = 200\ndead_after_ms = 1000\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n";
    let gw2_node = format!("wandist_dc2_{tag}@127.0.0.1");
    let gw2 = gateway(
        &dir,
        "dc2",
        format!(
            "[gateway]\ncluster = \"dc2\"\nname = \"gw-dc2\"\nlisten = \"127.0.0.1:0\"\n{knobs}{}[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [[route]]\ncluster = \"dc1\"\n[erlang]\nnode = \"{gw2_node}\"\ncookie = \"demo_cookie_dc2\"\nnodes = [{{ name = \"{}\", port = {} }}]\n",
            tls("dc2"),
            b1.name,
            dist_port(&epmd, &b1.name).await?
        ),
    )
    .await?;
    let gw2_addr = gw2.peers.ok_or("gw-dc2 has no listener")?;
    let primary_path = Forwarder::start(gw2_addr).await.map_err(|e| e.to_string())?;
    let gw1_node = format!("wandist_dc1_{tag}@127.0.0.1");
    let gw1 = gateway(
        &dir,
        "dc1",
        format!(
            "[gateway]\ncluster = \"dc1\"\nname = \"gw-dc1\"\n{knobs}{}[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\", \"{gw2_addr}\"]\nstandby = 1\n\
             [erlang]\nnode = \"{gw1_node}\"\ncookie = \"demo_cookie_dc1\"\nnodes = [{{ name = \"{}\", port = {} }}, {{ name = \"{}\", port = {} }}]\n",
            tls("dc1"),
            primary_path.addr,
            a1.name,
            dist_port(&epmd, &a1.name).await?,
            a2.name,
            dist_port(&epmd, &a2.name).await?
        ),
    )
    .await?;
    println!("  gateways: gw-dc1 ({gw1_node}) and gw-dc2 ({gw2_node}), mutual TLS, a primary and a standby link\n");

    let mut ok = true;
    let deadline = Instant::now() + erl::SOON;
    while metric(&gw1.metrics, "wandist_link_up", "role=\"standby\"") < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 1. Membership.
    let members = tokio::task::block_in_place(|| {
        a1.eval_until("length(pg:get_members(wan, echo)).", |v| v == "1");
        a2.eval_until("length(pg:get_members(wan, echo)).", |v| v == "1");
        a1.eval("[{P, node(P)} || P <- pg:get_members(wan, echo)].")
    });
    println!("1. dc2's `echo` appears in dc1's pg (on a1 and a2):\n     pg:get_members(wan, echo) = {members}\n     (a proxy on the gateway's hidden node; dc1 and dc2 never connect)");

    // 2. A gen_server:call across clusters.
    let (reply, took) = tokio::task::block_in_place(|| {
        let start = Instant::now();
        let r = a1.eval("gen_server:call(hd(pg:get_members(wan, echo)), hello, 5000).");
        (r, start.elapsed())
    });
    let want = format!("{{echo,hello,'{}'}}", b1.name);
    ok &= reply == want;
    println!("2. gen_server:call(EchoProxy, hello) from a1 = {reply}   ({took:.1?} round trip, including the REPL)");

    // 3. A stream while the primary is cut.
    let n = messages.max(100);
    tokio::task::block_in_place(|| {
        a1.eval_until("length(pg:get_members(wan, sink)).", |v| v == "1");
        a1.eval(&format!(
            "Sink = hd(pg:get_members(wan, sink)), spawn(fun() -> [begin Sink ! {{seq, I}}, \
             (I rem 200 =:= 0) andalso timer:sleep(2) end || I <- lists:seq(1, {n})] end), ok."
        ));
        let third = n / 3;
        b1.eval_until(&format!("element(2, Stats()) >= {third}."), |v| v == "true");
    });
    let cut_at = Instant::now();
    primary_path.cut().await;
    let stats = tokio::task::block_in_place(|| {
        b1.eval_until(&format!("element(2, Stats()) >= {n}."), |v| v == "true");
        b1.eval("Stats().")
    });
    let resumed = cut_at.elapsed();
    let failovers = metric(&gw1.metrics, "wandist_failovers_total", "peer=\"dc2\"");
    let good = stats == format!("{{stats,{n},0,0}}");
    ok &= good && failovers >= 1.0;
    println!(
        "3. a1 streamed {n} messages to dc2's sink; the primary link was cut a third of the way in:\n     \
         sink stats {{received in order, duplicates, gaps}} = {stats} {}\n     failovers on gw-dc1: {failovers}; all delivered {resumed:.1?} after the cut",
        if good { "— every message exactly once, in order" } else { "— NOT as expected" }
    );

    // 4. Metrics.
    println!(
        "4. metrics: http://{}/metrics (gw-dc1), http://{}/metrics (gw-dc2)",
        gw1.metrics_addr.map(|a| a.to_string()).unwrap_or_default(),
        gw2.metrics_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    println!(
        "     gw-dc1: wandist_erlang_messages_total{{to_peers}} {}, wandist_proxies {}, wandist_retransmitted_messages_total {}",
        metric(&gw1.metrics, "wandist_erlang_messages_total", "to_peers"),
        metric(&gw1.metrics, "wandist_proxies", ""),
        metric(&gw1.metrics, "wandist_retransmitted_messages_total", "peer=\"dc2\"")
    );

    gw1.stop().await;
    gw2.stop().await;
    drop(primary_path);
    drop((a1, a2, b1, epmd));
    let _ = std::fs::remove_dir_all(&dir);
    println!("\n{} — stopped the 3 Erlang nodes, epmd and both gateways", if ok { "demo OK" } else { "demo FAILED" });
    Ok(ok)
}

fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("wandist-demo-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}
