//! The Rust exchange loop alone (no Python): one tensor sent and received between two servers in
//! this process, through shared memory (the same-host path) and over loopback gRPC, so
//! regressions show where they come from.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use distsrv::base::cluster::TaskId;
use distsrv::base::config::ServerConfig;
use distsrv::base::security::Security;
use distsrv::proto::DataType;
use distsrv::tensor::TensorMeta;

#[path = "../rust/tests/common/mod.rs"]
mod common;

fn exchange(c: &mut Criterion) {
    for (transport, shared_memory) in [("shm", true), ("grpc", false)] {
        send_recv(c, transport, shared_memory);
    }
}

fn send_recv(c: &mut Criterion, transport: &str, shared_memory: bool) {
    let config = ServerConfig {
        shared_memory,
        ..ServerConfig::default()
    };
    let mut servers = common::cluster_with(2, 2, config, Security::open());
    let b = servers.pop().expect("two servers");
    let a = servers.pop().expect("two servers");
    let runtime = a.runtime().expect("running");
    let mut group = c.benchmark_group(format!("send_recv_{transport}"));
    for size in [4usize << 10, 1 << 20, 64 << 20] {
        let meta =
            TensorMeta::checked(DataType::DtFloat as i32, vec![(size / 4) as u64]).expect("meta");
        let payload = Bytes::from(vec![1u8; size]);
        group.throughput(Throughput::Bytes(size as u64));
        if size >= 64 << 20 {
            group.sample_size(10);
        }
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |bench, _| {
            bench.iter(|| {
                let send = a
                    .task()
                    .exchange
                    .send(
                        TaskId::new("w", 1),
                        "t".into(),
                        meta.clone(),
                        payload.clone(),
                    )
                    .expect("send");
                runtime.block_on(send).expect("sent");
                runtime
                    .block_on(
                        b.task()
                            .exchange
                            .recv(TaskId::new("w", 0), "t".into(), None),
                    )
                    .expect("received")
            });
        });
    }
    group.finish();
    if shared_memory {
        return;
    }
    // A generated unary call's round trip: the gRPC transport's floor for small tensors.
    let peer = TaskId::new("w", 1);
    c.bench_function("get_status_round_trip", |bench| {
        bench.iter(|| {
            runtime
                .block_on(async {
                    let channel = a.task().peers.channel(&peer).await?;
                    distsrv::transport::status::get_status(channel).await
                })
                .expect("status")
        });
    });
}

criterion_group!(benches, exchange);
criterion_main!(benches);
