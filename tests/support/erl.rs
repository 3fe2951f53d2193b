//! Real Erlang nodes for tests: the library's driver (also used by `wandist demo`).

#[allow(unused_imports)]
pub use wandist::demo::erl::{Epmd, Erl};

/// A private EPMD; tests need `erl` (apt-get install -y erlang-nox; .ci/run does).
pub fn epmd() -> Epmd {
    assert!(wandist::demo::erl::available(), "erl is not installed: apt-get install -y erlang-nox (.ci/run does)");
    Epmd::start().expect("cannot start epmd")
}
