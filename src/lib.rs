//! wandist: a gateway that bridges disjoint Erlang/OTP clusters.
//!
//! Layers point one way: `gateway` wires `link` (async I/O) over `wire`
//! (frames, no I/O) and `config`; see ARCHITECTURE.md.

pub mod certs;
pub mod config;
pub mod date;
pub mod demo;
pub mod erlang;
pub mod gateway;
pub mod link;
pub mod membership;
pub mod metrics;
pub mod route;
pub mod stop;
pub mod tls;
pub mod wire;
