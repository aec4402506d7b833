//! Remote operations between two servers in one process, with Rust closures as handlers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use distsrv::base::cluster::TaskId;
use distsrv::base::config::ServerConfig;
use distsrv::base::errors::{Code, Error, Result};
use distsrv::base::security::Security;
use distsrv::node::server::Server;
use distsrv::ops::remote::Call;
use distsrv::proto::{self, value::Kind};

mod common;

fn int(value: i64) -> proto::Value {
    proto::Value {
        kind: Some(Kind::IntValue(value)),
    }
}

fn kwargs(entries: &[(&str, i64)]) -> Vec<proto::DictEntry> {
    entries
        .iter()
        .map(|(key, value)| proto::DictEntry {
            key: (*key).to_owned(),
            value: Some(int(*value)),
        })
        .collect()
}

async fn add(call: Call) -> Result<proto::Value> {
    let sum = call
        .kwargs
        .iter()
        .map(
            |entry| match entry.value.as_ref().and_then(|v| v.kind.as_ref()) {
                Some(Kind::IntValue(value)) => Ok(*value),
                _ => Err(Error::invalid_argument(format!(
                    "{} is not an int",
                    entry.key
                ))),
            },
        )
        .sum::<Result<i64>>()?;
    Ok(int(sum))
}

/// Task 1 serves "add", "caller" and "sleep"; task 0 calls it.
fn pair() -> (Server, Server) {
    let mut servers = common::cluster(2, 2);
    let b = servers.pop().expect("two servers");
    let operations = &b.task().operations;
    operations.add("add", Arc::new(add));
    operations.add(
        "caller",
        Arc::new(|call: Call| async move {
            let caller = call.caller.map(|task| task.to_string()).unwrap_or_default();
            Ok(proto::Value {
                kind: Some(Kind::StringValue(caller)),
            })
        }),
    );
    operations.add(
        "sleep",
        Arc::new(|_call: Call| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(int(0))
        }),
    );
    (servers.pop().expect("two servers"), b)
}

#[test]
fn an_operation_runs_on_the_peer_and_answers() {
    let (a, _b) = pair();
    let runtime = a.runtime().unwrap();
    let to = TaskId::new("w", 1);
    let operations = &a.task().operations;
    let sum = runtime.block_on(operations.call(
        &a.task().peers,
        to.clone(),
        "add".into(),
        kwargs(&[("x", 2), ("y", 40)]),
        None,
    ));
    assert_eq!(sum.unwrap().value, int(42));
    let caller =
        runtime.block_on(operations.call(&a.task().peers, to, "caller".into(), vec![], None));
    assert_eq!(
        caller.unwrap().value.kind,
        Some(Kind::StringValue("/job:w/task:0".into()))
    );
}

#[test]
fn failures_say_where_they_happened_and_keep_their_code() {
    let (a, b) = pair();
    b.task().operations.block(["caller".to_owned()]);
    let runtime = a.runtime().unwrap();
    let to = TaskId::new("w", 1);
    let call = |op: &str, args| {
        runtime.block_on(a.task().operations.call(
            &a.task().peers,
            to.clone(),
            op.into(),
            args,
            None,
        ))
    };
    let unknown = call("nope", vec![]).unwrap_err();
    assert_eq!(unknown.code, Code::Unimplemented);
    assert_eq!(unknown.task.as_deref(), Some("/job:w/task:1"));
    assert_eq!(
        call("caller", vec![]).unwrap_err().code,
        Code::PermissionDenied
    );
    let bad = vec![proto::DictEntry {
        key: "x".into(),
        value: None,
    }];
    assert_eq!(call("add", bad).unwrap_err().code, Code::InvalidArgument);
    assert!(b.task().operations.remove("add"));
    assert_eq!(call("add", vec![]).unwrap_err().code, Code::Unimplemented);
}

#[test]
fn a_timeout_bounds_the_call_and_other_calls_go_on() {
    let (a, _b) = pair();
    let runtime = a.runtime().unwrap();
    let to = TaskId::new("w", 1);
    let operations = &a.task().operations;
    let began = Instant::now();
    let slow = runtime.block_on(operations.call(
        &a.task().peers,
        to.clone(),
        "sleep".into(),
        vec![],
        Some(Duration::from_millis(200)),
    ));
    assert_eq!(slow.unwrap_err().code, Code::DeadlineExceeded);
    assert!(began.elapsed() < Duration::from_secs(5));
    let sum = runtime.block_on(operations.call(
        &a.task().peers,
        to,
        "add".into(),
        kwargs(&[("x", 1)]),
        None,
    ));
    assert_eq!(sum.unwrap().value, int(1));
}

/// A float32 array as a call carries it.
fn array(bytes: Bytes) -> proto::Value {
    let len = (bytes.len() / 4) as i64;
    proto::Value {
        kind: Some(Kind::TensorValue(proto::TensorProto {
            dtype: proto::DataType::DtFloat as i32,
            tensor_shape: Some(proto::TensorShapeProto {
                dim: vec![proto::tensor_shape_proto::Dim {
                    size: len,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            tensor_content: bytes,
        })),
    }
}

/// The first large array of a call, and of its result, arrives on a 16-byte boundary of the
/// buffer it arrived in and stays there: the receiver makes its tensor without a copy.
#[test]
fn large_arrays_arrive_over_grpc_where_they_can_stay() {
    let config = ServerConfig {
        shared_memory: false,
        ..ServerConfig::default()
    };
    let mut servers = common::cluster_with(2, 2, config, Security::open());
    let b = servers.pop().expect("two servers");
    let a = servers.pop().expect("two servers");
    let echo = |call: Call| async move {
        let arrived = call
            .arrived
            .expect("a call over gRPC arrives into a buffer");
        let mut kwargs = call.kwargs;
        let value = kwargs.pop().and_then(|entry| entry.value);
        let Some(Kind::TensorValue(tensor)) = value.and_then(|value| value.kind) else {
            return Err(Error::invalid_argument("an array is due"));
        };
        let in_place = arrived
            .tensor(tensor.tensor_content)
            .map_err(|_| Error::internal("the array was copied or misaligned"))?;
        Ok(array(Bytes::from_owner(in_place)))
    };
    b.task().operations.add("echo", Arc::new(echo));
    let runtime = a.runtime().unwrap();
    let payload = Bytes::from((0..1u32 << 20).map(|i| i as u8).collect::<Vec<_>>());
    let task = a.task();
    // Keys of each length mod 16 put the array at each offset of the message.
    for pad in 0..16 {
        let args = vec![
            proto::DictEntry {
                key: "n".repeat(pad + 1),
                value: Some(int(pad as i64)),
            },
            proto::DictEntry {
                key: "x".into(),
                value: Some(array(payload.clone())),
            },
        ];
        let to = TaskId::new("w", 1);
        let called = task
            .operations
            .call(&task.peers, to, "echo".into(), args, None);
        let returned = runtime.block_on(called).expect("the echo");
        let Some(Kind::TensorValue(tensor)) = returned.value.kind else {
            panic!("an array comes back");
        };
        assert_eq!(tensor.tensor_content, payload);
        let arrived = returned.arrived.expect("over gRPC");
        assert!(arrived.tensor(tensor.tensor_content).is_ok(), "pad {pad}");
    }
}
