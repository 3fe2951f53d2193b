//! Erlang term translation: rewriting pids and references inside payloads
//! crossing clusters (everything else copied).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wandist::erlang::etf::{self, Emit, Found, Pid, Ref, Term};

fn pid(node: &str, id: u32) -> Pid {
    Pid { node: node.into(), id, serial: 0, creation: 7 }
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
    let big =
        etf::encode(&Term::tuple(vec![Term::atom("msg"), Term::Pid(pid("a@h", 1)), Term::Binary(vec![1; 65536])]));
    let mut g = c.benchmark_group("etf");
    for (name, input) in [("gen_call_100B", &call), ("message_64KiB", &big)] {
        g.throughput(Throughput::Bytes(input.len() as u64));
        let mut out = Vec::with_capacity(input.len() + 64);
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                etf::translate(
                    input,
                    &mut out,
                    &mut |f| {
                        Ok(match f {
                            Found::Pid(p) => Emit::Pid(Pid { node: "wandist_dc2@10.1.0.5".into(), ..p }),
                            Found::Ref(r) => Emit::Ref(r),
                            Found::HomePid(p) => Emit::Pid(p),
                            Found::HomeRef(r) => Emit::Ref(r),
                        })
                    },
                    false,
                )
                .unwrap()
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
