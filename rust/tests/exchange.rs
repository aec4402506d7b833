//! Two servers in one process exchanging tensors over loopback gRPC, with no Python involved.

use std::time::Duration;

use bytes::Bytes;
use distsrv::base::cluster::TaskId;
use distsrv::base::errors::Code;
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
