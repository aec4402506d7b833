//! The cluster's devices across servers in one process, with no Python involved.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use distsrv::base::cluster::TaskId;
use distsrv::base::errors::Code;
use distsrv::base::security::Security;
use distsrv::node::status;
use distsrv::transport::auth::Credentials;

mod common;
use common::cluster;

#[test]
fn every_task_answers_with_its_devices_and_incarnation() {
    let servers = cluster(2, 2);
    let task = servers[0].task();
    let runtime = servers[0].runtime().unwrap();
    let seen = runtime
        .block_on(status::wait_for_cluster(
            task,
            Some(Duration::from_secs(30)),
        ))
        .unwrap();
    let expected: BTreeMap<TaskId, u64> = servers
        .iter()
        .map(|s| (s.task_id().clone(), s.task().incarnation))
        .collect();
    assert_eq!(seen, expected);
    let statuses = runtime
        .block_on(status::statuses(task, Duration::from_secs(10)))
        .unwrap();
    for ((named, status), server) in statuses.iter().zip(&servers) {
        assert_eq!(named, server.task_id());
        assert_eq!(status.devices, server.task().devices);
        assert_eq!(status.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    }
}

#[test]
fn a_task_that_never_starts_is_named_in_bounded_time() {
    let servers = cluster(3, 2);
    let runtime = servers[0].runtime().unwrap();
    let began = Instant::now();
    let error = runtime
        .block_on(status::wait_for_cluster(
            servers[0].task(),
            Some(Duration::from_millis(800)),
        ))
        .unwrap_err();
    assert!(began.elapsed() < Duration::from_secs(5));
    assert_eq!(error.code, Code::DeadlineExceeded);
    assert!(error.message.contains("/job:w/task:2"), "{error}");
    assert!(!error.message.contains("/job:w/task:1"), "{error}");
}

#[test]
fn tensorflows_path_serves_the_same_devices() {
    let servers = cluster(1, 1);
    let runtime = servers[0].runtime().unwrap();
    let address = servers[0].local_addr();
    let (health, status) = runtime
        .block_on(status::query(
            &format!("grpc://{address}"),
            Duration::from_secs(10),
            &Security::open(),
        ))
        .unwrap();
    assert_eq!(health.as_deref(), Some("SERVING"));
    assert_eq!(status.devices, servers[0].task().devices);
    let channel = runtime.block_on(async {
        tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    });
    let reply = runtime
        .block_on(distsrv::transport::status::tensorflow_status(
            Credentials::new(&Security::open()).on(channel),
        ))
        .unwrap();
    assert_eq!(reply.device_attributes, servers[0].task().devices);
}
