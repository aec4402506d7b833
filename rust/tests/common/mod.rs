//! Servers for tests and benchmarks: tasks of job "w" on free ports of 127.0.0.1.

use std::collections::BTreeMap;

use distsrv::base::cluster::{Cluster, Jobs, ServerDef, TaskId};
use distsrv::base::config::ServerConfig;
use distsrv::base::security::Security;
use distsrv::node::server::Server;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Running servers for the first `started` of `count` tasks of job "w".
#[allow(dead_code)] // Each test crate uses some of them.
pub fn cluster(count: u32, started: u32) -> Vec<Server> {
    cluster_with(count, started, ServerConfig::default(), Security::open())
}

/// Like [`cluster`], with `config` and `security` for every server.
#[allow(dead_code)]
pub fn cluster_with(
    count: u32,
    started: u32,
    config: ServerConfig,
    security: Security,
) -> Vec<Server> {
    let tasks = (0..count).map(|i| (i, format!("127.0.0.1:{}", free_port())));
    let jobs = Jobs::from([("w".to_owned(), BTreeMap::from_iter(tasks))]);
    let cluster = Cluster::new(jobs).expect("a valid cluster");
    (0..started)
        .map(|index| {
            let def = ServerDef {
                cluster: cluster.clone(),
                task: TaskId::new("w", index),
                protocol: "grpc".into(),
                port: 0,
            };
            let server = Server::bind(def, config.clone(), security.clone()).expect("bind");
            server.start().expect("start");
            server
        })
        .collect()
}
