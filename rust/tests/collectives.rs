//! Collectives among servers in one process, with no Python involved: the ring and all-to-all
//! paths agree with a plain sum and give every task the same bytes.

use bytes::Bytes;
use distsrv::base::errors::{Code, Result};
use distsrv::node::server::Server;
use distsrv::ops::collectives::{Group, Kind};
use distsrv::proto::DataType;
use distsrv::tensor::reduce::ReduceOp;
use distsrv::tensor::{Tensor, TensorMeta};

mod common;

fn floats(values: impl Iterator<Item = f32>) -> (TensorMeta, Bytes) {
    let bytes: Vec<u8> = values.flat_map(f32::to_le_bytes).collect();
    let meta = TensorMeta::checked(DataType::DtFloat as i32, vec![bytes.len() as u64 / 4]).unwrap();
    (meta, Bytes::from(bytes))
}

/// Runs an all_reduce of `task`'s tensor (from `make`) on every server at once.
fn all_reduce(
    servers: &[Server],
    op: ReduceOp,
    make: impl Fn(usize) -> (TensorMeta, Bytes),
) -> Vec<Result<Tensor>> {
    let runtime = servers[0].runtime().unwrap();
    let calls = servers.iter().enumerate().map(|(rank, server)| {
        let task = server.task();
        let group = Group::new(&task.exchange, None).unwrap();
        let collective = task
            .collectives
            .begin(&task.exchange, &task.peers, group, None);
        let given = make(rank);
        async move {
            let reduced = collective.run(Kind::AllReduce(op), Some(given)).await?;
            Ok(reduced.expect("all_reduce gives every member a tensor"))
        }
    });
    runtime.block_on(futures::future::join_all(calls))
}

#[test]
fn all_reduce_sums_on_both_paths_with_the_same_bytes_everywhere() {
    let servers = common::cluster(3, 3);
    // 10 elements go all-to-all; 3M (12 MiB, segments of several pieces) round the ring.
    for count in [10usize, 3 << 20] {
        let results = all_reduce(&servers, ReduceOp::Sum, |rank| {
            floats((0..count).map(move |i| (i % 1000) as f32 * (rank + 1) as f32))
        });
        let first = results[0].as_ref().unwrap();
        for result in &results {
            assert_eq!(
                result.as_ref().unwrap().data.as_slice(),
                first.data.as_slice()
            );
        }
        let sums: &[f32] = bytemuck::cast_slice(first.data.as_slice());
        assert_eq!(sums.len(), count);
        for (i, sum) in sums.iter().enumerate().step_by(997) {
            assert_eq!(*sum, (i % 1000) as f32 * 6.0, "element {i} of {count}");
        }
    }
}

#[test]
fn tasks_that_disagree_all_fail() {
    let servers = common::cluster(2, 2);
    for count in [10usize, 1 << 20] {
        let results = all_reduce(&servers, ReduceOp::Max, |rank| {
            floats((0..count + rank).map(|i| i as f32))
        });
        for result in results {
            assert_eq!(result.err().map(|e| e.code), Some(Code::InvalidArgument));
        }
    }
}
