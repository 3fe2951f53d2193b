//! The local cluster: the gateway as a hidden Erlang node.
//!
//! [`node`] keeps one distribution connection per local node; [`core`]
//! decides everything else, as plain state (the pg scope mirror, proxies,
//! monitors, confirmed sends, and the translation of identities crossing
//! to and from peers); [`shell`] is the async loop around it.
//!
//! Between clusters, identities cross only as handles ([`handles`]): a
//! peer can name what this gateway gave it, and nothing else. A pid of this
//! cluster crossing to a peer becomes a handle, and a proxy there; a proxy
//! crossing back is its handle going home. Proxies are never advertised:
//! only this cluster's own members are exported (non-transitive).

pub mod atoms;
pub mod claims;
pub mod control;
pub mod core;
pub mod dist;
pub mod etf;
mod evict;
pub mod groups;
pub mod handles;
pub mod mirror;
pub mod monitors;
pub mod node;
pub mod proxies;
mod shell;
pub mod throttle;

pub use self::core::CONFIRM_NAME;
pub use shell::start;
