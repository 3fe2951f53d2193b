//! Distribution control messages as a typed enum: one variant per message
//! the gateway reads or writes, parsed once from the decoded control term
//! ([`Control::parse`]) and written back ([`Control::term`]), never matched
//! by tuple position elsewhere. Trace-token (`_TT`) variants are read as
//! their plain forms.

use super::dist::*;
use super::etf::{Pid, Ref, Term};

/// What a monitor watches: a process, or a name registered on a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Pid(Pid),
    Name(String),
}

impl Target {
    fn parse(t: &Term) -> Option<Target> {
        match t {
            Term::Pid(p) => Some(Target::Pid(p.clone())),
            Term::Atom(a) => Some(Target::Name(a.clone())),
            _ => None,
        }
    }

    fn term(&self) -> Term {
        match self {
            Target::Pid(p) => Term::Pid(p.clone()),
            Target::Name(n) => Term::atom(n),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// `{SEND, '', To}`: a message (the payload) to `to`.
    Send { to: Pid },
    /// `{SEND_SENDER, From, To}`.
    SendSender { from: Pid, to: Pid },
    /// `{REG_SEND, From, '', Name}`: to a name registered on the receiving node.
    RegSend { from: Pid, name: String },
    /// `{ALIAS_SEND, From, Alias}`.
    AliasSend { from: Pid, alias: Ref },
    /// `{LINK, From, To}`.
    Link { from: Pid, to: Pid },
    /// `{UNLINK_ID, Id, From, To}` (OTP 23+ unlink).
    UnlinkId { id: Term, from: Pid, to: Pid },
    /// `{UNLINK_ID_ACK, Id, From, To}`.
    UnlinkIdAck { id: Term, from: Pid, to: Pid },
    /// `{EXIT, From, To, Reason}`: a link broke.
    Exit { from: Pid, to: Pid, reason: Term },
    /// `{MONITOR_P, Watcher, Target, Ref}`.
    MonitorP { watcher: Pid, target: Target, mref: Ref },
    /// `{DEMONITOR_P, Watcher, Target, Ref}`.
    DemonitorP { watcher: Pid, target: Target, mref: Ref },
    /// `{MONITOR_P_EXIT, Target, Watcher, Ref, Reason}`.
    MonitorPExit { target: Target, watcher: Pid, mref: Ref, reason: Term },
    /// `{PAYLOAD_MONITOR_P_EXIT, Target, Watcher, Ref}`: the reason is the payload.
    PayloadMonitorPExit { target: Target, watcher: Pid, mref: Ref },
    /// Any other control message (groups leaders, spawn requests, exit
    /// signals with payloads...): by its code, ignored.
    Other { code: i64 },
}

/// Why a control term could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed control message (code {code}): {what}")]
pub struct Malformed {
    pub code: i64,
    pub what: &'static str,
}

impl Control {
    /// Reads a decoded control term.
    pub fn parse(t: &Term) -> Result<Control, Malformed> {
        let Some(items) = t.as_tuple() else { return Err(Malformed { code: -1, what: "not a tuple" }) };
        let code = items.first().and_then(Term::as_int).ok_or(Malformed { code: -1, what: "no code" })?;
        let bad = |what| Malformed { code, what };
        let pid = |i: usize| items.get(i).and_then(Term::as_pid).cloned().ok_or(bad("a pid expected"));
        let reference = |i: usize| items.get(i).and_then(Term::as_ref).cloned().ok_or(bad("a reference expected"));
        let target = |i: usize| items.get(i).and_then(Target::parse).ok_or(bad("a pid or a name expected"));
        let any = |i: usize| items.get(i).cloned().ok_or(bad("too short"));
        Ok(match code {
            SEND | SEND_TT => Control::Send { to: pid(2)? },
            SEND_SENDER | SEND_SENDER_TT => Control::SendSender { from: pid(1)?, to: pid(2)? },
            REG_SEND | REG_SEND_TT => Control::RegSend {
                from: pid(1)?,
                name: items.get(3).and_then(Term::as_atom).ok_or(bad("a name expected"))?.to_string(),
            },
            ALIAS_SEND | ALIAS_SEND_TT => Control::AliasSend { from: pid(1)?, alias: reference(2)? },
            LINK => Control::Link { from: pid(1)?, to: pid(2)? },
            UNLINK_ID => Control::UnlinkId { id: any(1)?, from: pid(2)?, to: pid(3)? },
            UNLINK_ID_ACK => Control::UnlinkIdAck { id: any(1)?, from: pid(2)?, to: pid(3)? },
            EXIT => Control::Exit { from: pid(1)?, to: pid(2)?, reason: any(3)? },
            MONITOR_P => Control::MonitorP { watcher: pid(1)?, target: target(2)?, mref: reference(3)? },
            DEMONITOR_P => Control::DemonitorP { watcher: pid(1)?, target: target(2)?, mref: reference(3)? },
            MONITOR_P_EXIT => {
                Control::MonitorPExit { target: target(1)?, watcher: pid(2)?, mref: reference(3)?, reason: any(4)? }
            }
            PAYLOAD_MONITOR_P_EXIT => {
                Control::PayloadMonitorPExit { target: target(1)?, watcher: pid(2)?, mref: reference(3)? }
            }
            code => Control::Other { code },
        })
    }

    /// The control term, as a node reads it.
    pub fn term(&self) -> Term {
        let t = |code: i64, rest: Vec<Term>| Term::tuple([vec![Term::Int(code)], rest].concat());
        match self {
            Control::Send { to } => t(SEND, vec![Term::atom(""), Term::Pid(to.clone())]),
            Control::SendSender { from, to } => t(SEND_SENDER, vec![Term::Pid(from.clone()), Term::Pid(to.clone())]),
            Control::RegSend { from, name } => {
                t(REG_SEND, vec![Term::Pid(from.clone()), Term::atom(""), Term::atom(name)])
            }
            Control::AliasSend { from, alias } => {
                t(ALIAS_SEND, vec![Term::Pid(from.clone()), Term::Ref(alias.clone())])
            }
            Control::Link { from, to } => t(LINK, vec![Term::Pid(from.clone()), Term::Pid(to.clone())]),
            Control::UnlinkId { id, from, to } => {
                t(UNLINK_ID, vec![id.clone(), Term::Pid(from.clone()), Term::Pid(to.clone())])
            }
            Control::UnlinkIdAck { id, from, to } => {
                t(UNLINK_ID_ACK, vec![id.clone(), Term::Pid(from.clone()), Term::Pid(to.clone())])
            }
            Control::Exit { from, to, reason } => {
                t(EXIT, vec![Term::Pid(from.clone()), Term::Pid(to.clone()), reason.clone()])
            }
            Control::MonitorP { watcher, target, mref } => {
                t(MONITOR_P, vec![Term::Pid(watcher.clone()), target.term(), Term::Ref(mref.clone())])
            }
            Control::DemonitorP { watcher, target, mref } => {
                t(DEMONITOR_P, vec![Term::Pid(watcher.clone()), target.term(), Term::Ref(mref.clone())])
            }
            Control::MonitorPExit { target, watcher, mref, reason } => t(
                MONITOR_P_EXIT,
                vec![target.term(), Term::Pid(watcher.clone()), Term::Ref(mref.clone()), reason.clone()],
            ),
            Control::PayloadMonitorPExit { target, watcher, mref } => {
                t(PAYLOAD_MONITOR_P_EXIT, vec![target.term(), Term::Pid(watcher.clone()), Term::Ref(mref.clone())])
            }
            Control::Other { code } => t(*code, vec![]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::erlang::etf;

    #[test]
    fn every_variant_round_trips_through_its_term() {
        let p = |id| Pid { node: "a@h".into(), id, serial: 0, creation: 1 };
        let r = Ref { node: "a@h".into(), creation: 1, ids: vec![1, 2, 3] };
        let all = vec![
            Control::Send { to: p(1) },
            Control::SendSender { from: p(1), to: p(2) },
            Control::RegSend { from: p(1), name: "wandist".into() },
            Control::AliasSend { from: p(1), alias: r.clone() },
            Control::Link { from: p(1), to: p(2) },
            Control::UnlinkId { id: Term::Int(7), from: p(1), to: p(2) },
            Control::UnlinkIdAck { id: Term::Int(7), from: p(2), to: p(1) },
            Control::Exit { from: p(2), to: p(1), reason: Term::atom("noproc") },
            Control::MonitorP { watcher: p(1), target: Target::Pid(p(2)), mref: r.clone() },
            Control::MonitorP { watcher: p(1), target: Target::Name("x".into()), mref: r.clone() },
            Control::DemonitorP { watcher: p(1), target: Target::Pid(p(2)), mref: r.clone() },
            Control::MonitorPExit {
                target: Target::Pid(p(2)),
                watcher: p(1),
                mref: r.clone(),
                reason: Term::atom("x"),
            },
            Control::PayloadMonitorPExit { target: Target::Pid(p(2)), watcher: p(1), mref: r },
        ];
        for c in all {
            let bytes = etf::encode(&c.term());
            let (t, _) = etf::decode(&bytes).unwrap();
            assert_eq!(Control::parse(&t).unwrap(), c);
        }
        // Trace-token forms read as the plain ones; unknown codes are Other.
        let tt = Term::tuple(vec![Term::Int(SEND_SENDER_TT), Term::Pid(p(1)), Term::Pid(p(2)), Term::atom("token")]);
        assert_eq!(Control::parse(&tt).unwrap(), Control::SendSender { from: p(1), to: p(2) });
        assert_eq!(Control::parse(&Term::tuple(vec![Term::Int(29)])).unwrap(), Control::Other { code: 29 });
        // Malformed ones say what is wrong.
        let bad = Term::tuple(vec![Term::Int(SEND_SENDER), Term::atom("x"), Term::Pid(p(2))]);
        assert_eq!(Control::parse(&bad), Err(Malformed { code: SEND_SENDER, what: "a pid expected" }));
        assert!(Control::parse(&Term::atom("x")).is_err());
    }
}
