//! The payload scanner: rewriting identities in messages crossing clusters
//! (everything else copied and checked), both ways; and the cost of the
//! per-peer atom budget on messages from a peer (`peer_*` against
//! `peer_*_atom_budget`, the issue's ≤ 10 % target per 100 B message).
//!
//!     cargo bench --bench etf

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wandist::erlang::atoms::Atoms;
use wandist::erlang::etf::{self, Kind, Pid, PidView, Ref, RefView, Refusal, Source, Term, Translator};

fn pid(node: &str, id: u32) -> Pid {
    Pid { node: node.into(), id, serial: 0, creation: 7 }
}

/// As a gateway's outbound translation: local identities become handles.
struct Out(u64);
impl Translator for Out {
    fn pid(&mut self, _p: PidView<'_>, out: &mut Vec<u8>) -> Result<(), Refusal> {
        self.0 += 1;
        etf::put_handle(out, etf::PEER_PID, self.0);
        Ok(())
    }
    fn reference(&mut self, _r: RefView<'_>, out: &mut Vec<u8>) -> Result<(), Refusal> {
        self.0 += 1;
        etf::put_handle(out, etf::PEER_REF, self.0);
        Ok(())
    }
}

/// As a gateway's inbound translation: handles become proxies (here, a
/// pid or reference written from its number), atoms optionally budgeted.
struct In<'a>(Option<&'a mut Atoms>);
impl Translator for In<'_> {
    fn handle(&mut self, kind: Kind, _home: bool, h: u64, out: &mut Vec<u8>) -> Result<(), Refusal> {
        match kind {
            Kind::Pid => etf::put_pid_parts(out, "wandist_dc2@10.1.0.5", h as u32, 0, 7),
            Kind::Ref => etf::put_ref_parts(out, "wandist_dc2@10.1.0.5", 7, &[h as u32, 0, 0x5741_4e44]),
        }
        Ok(())
    }
    fn atom(&mut self, text: &[u8]) -> Result<(), Refusal> {
        match self.0.as_mut() {
            Some(a) => a.admit(text),
            None => Ok(()),
        }
    }
}

fn translate(c: &mut Criterion) {
    let call = etf::encode(&Term::tuple(vec![
        Term::atom("$gen_call"),
        Term::tuple(vec![
            Term::Pid(pid("chat@10.0.0.6", 77)),
            Term::List(
                vec![Term::atom("alias")],
                Box::new(Term::Ref(Ref { node: "chat@10.0.0.6".into(), creation: 7, ids: vec![1, 2, 3] })),
            ),
        ]),
        Term::tuple(vec![Term::atom("msg"), Term::Binary(vec![7; 100])]),
    ]));
    let chat = etf::encode(&Term::Map(vec![
        (Term::atom("from"), Term::Pid(pid("chat@10.0.0.6", 77))),
        (Term::atom("room"), Term::Binary(b"general".to_vec())),
        (Term::atom("text"), Term::Binary(vec![b'x'; 120])),
        (Term::atom("at"), Term::Int(1_764_000_000)),
        (Term::atom("kind"), Term::atom("message")),
    ]));
    let big =
        etf::encode(&Term::tuple(vec![Term::atom("msg"), Term::Pid(pid("a@h", 1)), Term::Binary(vec![1; 65536])]));
    let mut g = c.benchmark_group("etf");
    for (name, input) in [("gen_call_100B", &call), ("chat_map", &chat), ("message_64KiB", &big)] {
        // Leaving: from a node, identities to handles.
        let mut wire = Vec::new();
        etf::translate(input, &mut wire, &mut Out(0), Source::Node).unwrap();
        g.throughput(Throughput::Bytes(input.len() as u64));
        let mut out = Vec::with_capacity(input.len() + 64);
        g.bench_function(format!("node_{name}"), |b| {
            b.iter(|| {
                out.clear();
                etf::translate(input, &mut out, &mut Out(0), Source::Node).unwrap()
            })
        });
        // Arriving: from a peer, handles to identities, checked strictly;
        // without and with the atom budget (its atoms already known, as in
        // steady traffic).
        g.bench_function(format!("peer_{name}"), |b| {
            b.iter(|| {
                out.clear();
                etf::translate(&wire, &mut out, &mut In(None), Source::Peer).unwrap()
            })
        });
        let mut atoms = Atoms::new(10_000);
        g.bench_function(format!("peer_{name}_atom_budget"), |b| {
            b.iter(|| {
                out.clear();
                etf::translate(&wire, &mut out, &mut In(Some(&mut atoms)), Source::Peer).unwrap()
            })
        });
    }
    g.bench_function("decode_control", |b| {
        let control =
            etf::encode(&Term::tuple(vec![Term::Int(22), Term::Pid(pid("a@h", 1)), Term::Pid(pid("gw@h", 1000))]));
        b.iter(|| etf::decode(&control).unwrap())
    });
    g.finish();
}

criterion_group!(benches, translate);
criterion_main!(benches);
