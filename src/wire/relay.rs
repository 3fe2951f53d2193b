//! What the Erlang side puts in a data frame's body: a relay header
//! (serialized by `wire::codec`), then, for `Send`, `AliasSend` and
//! `Down`, an ETF payload in which identities appear only as handles
//! (`erlang::etf`'s `PEER_*` and `HOME_*` tags).
//!
//! Whose handle is whose: `to`, `Monitor::target` and `Demonitor::target`
//! name identities of the RECEIVING cluster, by handles the receiver
//! issued to the sender; `from` and `Down::target` name identities of the
//! SENDING cluster, by handles the sender issued to the receiver. A
//! receiver resolves the first kind only through its table for that peer,
//! and refuses what is not there; it never resolves a name.

use serde::{Deserialize, Serialize};

use super::Handle;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Relay {
    /// A message to a process of the receiving cluster; the payload is the
    /// message. `from`: the sending process (`None`: the gateway itself).
    Send {
        to: Handle,
        from: Option<Handle>,
    },
    /// A message to an alias (a reference of the receiving cluster, e.g.
    /// the reply alias of a `gen_server:call`).
    AliasSend {
        to: Handle,
        from: Option<Handle>,
    },
    /// Start watching a process of the receiving cluster for the sender.
    Monitor {
        target: Handle,
    },
    Demonitor {
        target: Handle,
    },
    /// A process of the sending cluster that the receiver watched ended;
    /// the payload is the exit reason.
    Down {
        target: Handle,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::codec;

    /// The encoding docs/PROTOCOL.md gives: a varint variant index, then
    /// varint fields, `Option` as 0 or 1 and the value.
    #[test]
    fn the_encoding_is_the_documented_one() {
        let cases: Vec<(Relay, Vec<u8>)> = vec![
            (Relay::Send { to: Handle(5), from: None }, vec![0, 5, 0]),
            (Relay::Send { to: Handle(300), from: Some(Handle(7)) }, vec![0, 251, 44, 1, 1, 7]),
            (Relay::AliasSend { to: Handle(1), from: Some(Handle(2)) }, vec![1, 1, 1, 2]),
            (Relay::Monitor { target: Handle(9) }, vec![2, 9]),
            (Relay::Demonitor { target: Handle(9) }, vec![3, 9]),
            (Relay::Down { target: Handle(u64::MAX) }, vec![4, 253, 255, 255, 255, 255, 255, 255, 255, 255]),
        ];
        for (relay, bytes) in cases {
            let mut out = Vec::new();
            codec::encode_value(&relay, &mut out).unwrap();
            assert_eq!(out, bytes, "{relay:?}");
            let (back, used) = codec::from_prefix::<Relay>(&bytes).unwrap();
            assert_eq!((back, used), (relay, bytes.len()));
        }
        assert!(codec::from_prefix::<Relay>(&[5]).is_err(), "no sixth variant");
        assert!(codec::from_prefix::<Relay>(&[0, 5]).is_err(), "truncated");
    }
}
