//! The Rust exchange loop alone (no Python): one tensor sent and received between two servers in
//! this process over loopback gRPC, so regressions show where they come from.

use std::collections::BTreeMap;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use distsrv::cluster::{Cluster, Jobs, ServerDef, TaskId};
use distsrv::codec::TensorMeta;
use distsrv::config::ServerConfig;
use distsrv::proto::DataType;
use distsrv::server::Server;

fn server(cluster: &Cluster, index: u32) -> Server {
    let def = ServerDef {
        cluster: cluster.clone(),
        task: TaskId::new("w", index),
        protocol: "grpc".into(),
        port: 0,
    };
    let server = Server::bind(def, ServerConfig::default()).expect("bind");
    server.start().expect("start");
    server
}

fn exchange(c: &mut Criterion) {
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    };
    let jobs = Jobs::from([(
        "w".to_owned(),
        BTreeMap::from([
            (0, format!("127.0.0.1:{}", port())),
            (1, format!("127.0.0.1:{}", port())),
        ]),
    )]);
    let cluster = Cluster::new(jobs).expect("cluster");
    let (a, b) = (server(&cluster, 0), server(&cluster, 1));
    let runtime = a.runtime().expect("running");
    let mut group = c.benchmark_group("send_recv");
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
}

criterion_group!(benches, exchange);
criterion_main!(benches);
