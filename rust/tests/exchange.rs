//! Two servers in one process exchanging tensors over loopback gRPC, with no Python involved.

use std::time::Duration;

use bytes::Bytes;
use distsrv::base::cluster::TaskId;
use distsrv::base::config::ServerConfig;
use distsrv::base::errors::Code;
use distsrv::base::security::Security;
use distsrv::node::server::{Server, Status};
use distsrv::proto::DataType;
use distsrv::tensor::TensorMeta;

mod common;

fn pair() -> (Server, Server) {
    let mut servers = common::cluster(2, 2);
    let b = servers.pop().expect("two servers");
    (servers.pop().expect("two servers"), b)
}

fn floats(n: usize) -> (TensorMeta, Bytes) {
    let values: Vec<u8> = (0..n as u32)
        .flat_map(|v| (v as f32).to_le_bytes())
        .collect();
    let meta = TensorMeta::checked(DataType::DtFloat as i32, vec![n as u64]).unwrap();
    (meta, Bytes::from(values))
}

#[test]
fn a_tensor_crosses_and_arrives_whole() {
    let (a, b) = pair();
    let runtime = a.runtime().unwrap();
    for n in [0, 1, 1000, 3 << 20] {
        let (meta, payload) = floats(n);
        let send = a
            .task()
            .exchange
            .send(
                TaskId::new("w", 1),
                "x".into(),
                meta.clone(),
                payload.clone(),
            )
            .unwrap();
        runtime.block_on(send).unwrap();
        let received = runtime
            .block_on(
                b.task()
                    .exchange
                    .recv(TaskId::new("w", 0), "x".into(), None),
            )
            .unwrap();
        assert_eq!(received.meta, meta);
        assert_eq!(received.data.as_slice(), &payload[..]);
    }
}

#[test]
fn recv_times_out_and_stop_ends_waiting() {
    let (a, b) = pair();
    let runtime = b.runtime().unwrap();
    let waited = runtime.block_on(b.task().exchange.recv(
        TaskId::new("w", 0),
        "nothing".into(),
        Some(Duration::from_millis(50)),
    ));
    assert_eq!(waited.err().map(|e| e.code), Some(Code::DeadlineExceeded));
    let port = a.local_addr().port();
    a.stop(None);
    assert_eq!(a.status(), Status::Closed);
    // The port is free again at once.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port released by stop");
}

#[test]
fn a_secured_pair_exchanges_over_both_transports_and_refuses_a_task_without_the_token() {
    let tls =
        distsrv::transport::tls::temporary(&["127.0.0.1".to_owned()], &[None]).unwrap()[0].clone();
    for (shared_memory, with_tls) in [(true, false), (false, false), (true, true), (false, true)] {
        let config = ServerConfig {
            shared_memory,
            ..ServerConfig::default()
        };
        let secured = |token: &[u8]| {
            let security = Security::with_token(token, true).unwrap();
            if with_tls {
                security.with_tls(tls.clone())
            } else {
                security
            }
        };
        let token = secured(b"a-cluster-token");
        let servers = common::cluster_with(3, 2, config.clone(), token);
        let (a, b) = (&servers[0], &servers[1]);
        let runtime = a.runtime().unwrap();
        let (meta, payload) = floats(1 << 18);
        let send = a.task().exchange.send(
            TaskId::new("w", 1),
            "x".into(),
            meta.clone(),
            payload.clone(),
        );
        runtime.block_on(send.unwrap()).unwrap();
        let received = runtime.block_on(b.task().exchange.recv(
            TaskId::new("w", 0),
            "x".into(),
            None,
        ));
        assert_eq!(received.unwrap().data.as_slice(), &payload[..]);

        // Task 2 of the same cluster, with another token: everything it sends is refused.
        let mut rogue_def = b.server_def().clone();
        rogue_def.task = TaskId::new("w", 2);
        rogue_def.port = 0;
        let rogue = Server::bind(rogue_def, config, secured(b"a-guess")).unwrap();
        rogue.start().unwrap();
        let injected = rogue
            .task()
            .exchange
            .send(
                TaskId::new("w", 1),
                "x".into(),
                meta.clone(),
                payload.clone(),
            )
            .unwrap();
        let refused = rogue.runtime().unwrap().block_on(injected).unwrap_err();
        assert_eq!(refused.code, Code::Unauthenticated, "{refused}");
        let nothing = runtime.block_on(b.task().exchange.recv(
            TaskId::new("w", 2),
            "x".into(),
            Some(Duration::from_millis(200)),
        ));
        assert_eq!(nothing.err().map(|e| e.code), Some(Code::DeadlineExceeded));
    }
}
