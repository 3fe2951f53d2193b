//! The top: the gateway and its local side, composed. `gateway` knows
//! nothing of Erlang and `erlang` nothing of the gateway; both speak
//! `local`'s contract, and this module plugs one into the other.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::gateway::{self, GatewayError, Options, Prepared, Running};
use crate::metrics::Metrics;

/// Size of each route's queue toward the Erlang side.
pub const TO_LOCAL_QUEUE: usize = 4096;

/// Starts the gateway with its local side: the Erlang cluster of the
/// `[erlang]` table, or (without one) a side that only logs what arrives.
pub async fn start(prepared: Prepared, metrics: Metrics) -> Result<Running, GatewayError> {
    let Some(cfg) = prepared.config.erlang.clone() else {
        let mut running = gateway::start(prepared, metrics, TO_LOCAL_QUEUE).await?;
        running.discard_inboxes();
        return Ok(running);
    };
    let dist_tls = prepared.dist_tls.clone();
    let g = prepared.config.gateway.clone();
    let routes = prepared.config.routes.clone();
    // No peer link until every local node has been tried.
    let gate = CancellationToken::new();
    let options = Options {
        queue: TO_LOCAL_QUEUE,
        gate: Some(gate.clone()),
        // With several instances, routes start as this one claims them.
        routes_now: !cfg.coordinate,
        group_check: Some(crate::erlang::groups::check),
    };
    let mut running = gateway::start_with(prepared, metrics.clone(), options).await?;
    let inboxes = std::mem::take(&mut running.inboxes);
    // (Each route's outcome comes at most twice per change: room for
    // every route twice over, and more.)
    let (claims_tx, claims_rx) = match cfg.coordinate {
        true => {
            let (tx, rx) = mpsc::channel(2 * routes.len() + 16);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let (root, tracker) = running.root();
    let control = crate::erlang::start(
        &cfg,
        dist_tls,
        &g,
        &routes,
        running.local(),
        inboxes,
        metrics,
        root,
        gate,
        &tracker,
        claims_tx,
    );
    running.attach(control, claims_rx);
    Ok(running)
}

/// Runs the gateway and its local side until `shutdown` is cancelled, then
/// drains within the configured grace period. Each item from `reloads`
/// loads the configuration file again and applies it (`Running::reload`).
pub async fn run(
    prepared: Prepared,
    metrics: Metrics,
    shutdown: CancellationToken,
    reloads: mpsc::Receiver<()>,
) -> Result<(), GatewayError> {
    let running = start(prepared, metrics).await?;
    running.serve(shutdown, reloads).await;
    Ok(())
}
