//! Collectives among servers in one process, with no Python involved: the ring and all-to-all
//! paths agree with a plain sum and give every task the same bytes.

use bytes::Bytes;
use distsrv::base::errors::{Code, Result};
use distsrv::node::server::Server;
use distsrv::ops::collectives::{Group, Kind};
use distsrv::proto::DataType;
use distsrv::tensor::reduce::ReduceOp;
use distsrv::tensor::{ResultMemory, Tensor, TensorMeta};

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
            let reduced = collective
                .run(Kind::AllReduce(op), Some(given), None)
                .await?;
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

#[test]
fn a_ring_all_reduce_writes_its_result_into_the_memory_it_is_given() {
    let servers = common::cluster(2, 2);
    let count = 1usize << 20; // 4 MiB: the ring
    let runtime = servers[0].runtime().unwrap();
    let mut memories = vec![vec![0u8; count * 4]; servers.len()];
    let calls =
        servers
            .iter()
            .zip(memories.iter_mut())
            .enumerate()
            .map(|(rank, (server, memory))| {
                let task = server.task();
                let group = Group::new(&task.exchange, None).unwrap();
                let collective = task
                    .collectives
                    .begin(&task.exchange, &task.peers, group, None);
                let given = floats((0..count).map(move |i| (i % 100) as f32 + rank as f32));
                // SAFETY: the vector outlives the collective, which alone writes it.
                let into = unsafe {
                    ResultMemory::new(memory.as_mut_ptr(), memory.len(), async { true }, ())
                };
                collective.run(Kind::AllReduce(ReduceOp::Sum), Some(given), Some(into))
            });
    for result in runtime.block_on(futures::future::join_all(calls)) {
        assert!(result.unwrap().is_none(), "the result went into the memory");
    }
    for memory in &memories {
        let sums: &[f32] = bytemuck::cast_slice(memory);
        for (i, sum) in sums.iter().enumerate().step_by(991) {
            assert_eq!(*sum, 2.0 * (i % 100) as f32 + 1.0, "element {i}");
        }
    }
}

#[test]
fn memory_that_is_not_let_go_in_time_gets_no_result_and_a_tensor_comes_back() {
    let servers = common::cluster(2, 2);
    let count = 1usize << 20;
    let runtime = servers[0].runtime().unwrap();
    let mut memories = vec![vec![0u8; count * 4]; servers.len()];
    let calls = servers
        .iter()
        .zip(memories.iter_mut())
        .map(|(server, memory)| {
            let task = server.task();
            let group = Group::new(&task.exchange, None).unwrap();
            let collective = task
                .collectives
                .begin(&task.exchange, &task.peers, group, None);
            let given = floats((0..count).map(|i| i as f32));
            // SAFETY: as above; this memory never becomes free, so it is never written.
            let into = unsafe {
                ResultMemory::new(memory.as_mut_ptr(), memory.len(), async { false }, ())
            };
            collective.run(Kind::AllReduce(ReduceOp::Max), Some(given), Some(into))
        });
    for result in runtime.block_on(futures::future::join_all(calls)) {
        let tensor = result
            .unwrap()
            .expect("a tensor, since the memory was not free");
        let maxima: &[f32] = bytemuck::cast_slice(tensor.data.as_slice());
        assert_eq!(maxima[12345], 12345.0);
    }
    assert!(
        memories
            .iter()
            .all(|memory| memory.iter().all(|&byte| byte == 0))
    );
}
