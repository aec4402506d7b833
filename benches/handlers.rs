//! Remote operations without Python: a no-op call between two servers in this process over
//! loopback gRPC, with a Rust closure as the handler: the transport's share of a call.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use distsrv::base::cluster::TaskId;
use distsrv::ops::remote::Call;
use distsrv::proto;

#[path = "../rust/tests/common/mod.rs"]
mod common;

fn call(c: &mut Criterion) {
    let mut servers = common::cluster(2, 2);
    let b = servers.pop().expect("two servers");
    let a = servers.pop().expect("two servers");
    b.task().operations.add(
        "noop",
        Arc::new(|_call: Call| async {
            Ok(proto::Value {
                kind: Some(proto::value::Kind::NullValue(0)),
            })
        }),
    );
    let runtime = a.runtime().expect("running");
    let peer = TaskId::new("w", 1);
    c.bench_function("noop_call_round_trip", |bench| {
        bench.iter(|| {
            let called = a.task().operations.call(
                &a.task().peers,
                peer.clone(),
                "noop".into(),
                vec![],
                None,
            );
            runtime.block_on(called).expect("called")
        });
    });
}

criterion_group!(benches, call);
criterion_main!(benches);
