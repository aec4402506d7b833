//! Parameter-server variables: named tensors a task hosts, which any task reads and updates.
//!
//! Updates are applied on the host, in Rust, under the variable's own lock, so concurrent
//! updates from many workers are atomic per variable and never lost; different variables do not
//! wait for each other. A task reaches a variable it hosts directly and another task's through
//! the `VariableOp` RPC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::base::cluster::TaskId;
use crate::base::config::ServerConfig;
use crate::base::errors::{Code, Error, Result};
use crate::inbox::TENSOR_OVERHEAD_BYTES;
use crate::proto::variable_request::Op;
use crate::proto::worker_client::WorkerClient;
use crate::proto::{VariableRequest, VariableResponse};
use crate::tensor::reduce::{self, ReduceOp};
use crate::tensor::{Tensor, TensorBuf, TensorMeta};
use crate::transport::Peers;
use crate::wire;

/// The variables one task hosts, and its way to those of other tasks.
pub struct Variables {
    me: TaskId,
    max_message_bytes: usize,
    hosted: Mutex<Hosted>,
    /// What the hosted variables may hold in all: `max_pending_bytes`, a budget of their own.
    max_bytes: u64,
}

/// Variables by name, and the bytes they hold with their names and bookkeeping.
#[derive(Default)]
struct Hosted {
    by_name: HashMap<String, Arc<Mutex<Tensor>>>,
    bytes: u64,
}

/// An operation on a variable: "read", "create", "assign", "assign_add" or "sgd_step".
pub fn parse_op(name: &str) -> Result<Op> {
    Op::from_str_name(&name.to_uppercase())
        .ok_or_else(|| Error::invalid_argument(format!("unknown variable op {name:?}")))
}

impl Variables {
    pub fn new(me: TaskId, config: &ServerConfig) -> Self {
        Self {
            me,
            max_message_bytes: config.max_message_bytes,
            hosted: Mutex::default(),
            max_bytes: config.max_pending_bytes,
        }
    }

    /// Applies `op` to variable `name` hosted on `host` (this task, or another over `peers`);
    /// a read gives the value.
    pub async fn call(
        &self,
        peers: &Peers,
        host: &TaskId,
        name: String,
        op: Op,
        value: Option<(TensorMeta, Bytes)>,
        learning_rate: f64,
    ) -> Result<Option<Tensor>> {
        let request = VariableRequest {
            name,
            op: op as i32,
            value: value.map(|(meta, data)| wire::tensor_proto(&meta, data)),
            learning_rate,
        };
        let what = format!("{op:?} of variable {:?} on {host}", request.name);
        if *host == self.me {
            let done = if op == Op::Read {
                self.read(&request.name).map(Some)
            } else {
                self.apply(request).map(|_| None)
            };
            return done.map_err(|e| e.context(what));
        }
        peers.cluster().require(host)?;
        let channel = peers.channel(host).await?;
        let response = WorkerClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
            .variable_op(request)
            .await
            .map_err(|status| Error::from(status).context(what))?;
        let Some(value) = response.into_inner().value else {
            return Ok(None);
        };
        let (meta, data) = wire::from_tensor_proto(value)?;
        Ok(Some(Tensor {
            meta,
            data: TensorBuf::from_slice(&data),
        }))
    }

    /// Serves one VariableOp on a variable this task hosts.
    /// Applies one request to the variables hosted here.
    pub fn apply(&self, request: VariableRequest) -> Result<VariableResponse> {
        let op = Op::try_from(request.op)
            .map_err(|_| Error::invalid_argument(format!("unknown variable op {}", request.op)))?;
        let name = request.name;
        if op == Op::Read {
            let value = self.read(&name)?;
            return Ok(VariableResponse {
                value: Some(wire::tensor_proto(
                    &value.meta,
                    Bytes::from_owner(value.data),
                )),
            });
        }
        let value = request
            .value
            .ok_or_else(|| Error::invalid_argument(format!("{op:?} of {name:?} needs a value")))?;
        let (meta, data) = wire::from_tensor_proto(value)?;
        if op == Op::Create {
            let mut hosted = self.hosted.lock().unwrap_or_else(|e| e.into_inner());
            if hosted.by_name.contains_key(&name) {
                return Err(Error::new(
                    Code::AlreadyExists,
                    format!("variable {name:?} already exists"),
                ));
            }
            // A held tensor's bookkeeping too, so that empty variables count.
            let cost = (data.len() as u64)
                .saturating_add(name.len() as u64)
                .saturating_add(TENSOR_OVERHEAD_BYTES);
            let total = hosted.bytes.saturating_add(cost);
            if total > self.max_bytes {
                return Err(Error::resource_exhausted(format!(
                    "this task hosts {} bytes of variables (with their names and \
                     {TENSOR_OVERHEAD_BYTES} bytes each for bookkeeping); {cost} more would \
                     pass its limit of {} (max_pending_bytes)",
                    hosted.bytes, self.max_bytes
                )));
            }
            hosted.bytes = total;
            let variable = Tensor {
                meta,
                data: TensorBuf::from_slice(&data),
            };
            hosted.by_name.insert(name, Arc::new(Mutex::new(variable)));
            return Ok(VariableResponse::default());
        }
        let variable = self.get(&name)?;
        let mut variable = lock(&variable);
        if variable.meta != meta {
            return Err(Error::invalid_argument(format!(
                "variable {name:?} is {}, the update is {meta}",
                variable.meta
            )));
        }
        let dtype = meta.dtype;
        let current = variable.data.as_mut_slice();
        match op {
            Op::Assign => current.copy_from_slice(&data),
            Op::AssignAdd => {
                ReduceOp::Sum.check(dtype)?;
                reduce::combine(ReduceOp::Sum, dtype, current, &data)?;
            }
            Op::SgdStep => reduce::add_scaled(dtype, current, &data, -request.learning_rate)?,
            Op::Read | Op::Create => unreachable!("handled above"),
        }
        Ok(VariableResponse::default())
    }

    /// A copy of the variable's current value.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let variable = self.get(name)?;
        let variable = lock(&variable);
        Ok(Tensor {
            meta: variable.meta.clone(),
            data: TensorBuf::from_slice(variable.data.as_slice()),
        })
    }

    fn get(&self, name: &str) -> Result<Arc<Mutex<Tensor>>> {
        let hosted = self.hosted.lock().unwrap_or_else(|e| e.into_inner());
        hosted.by_name.get(name).cloned().ok_or_else(|| {
            Error::new(
                Code::NotFound,
                format!("no variable {name:?} (create it first)"),
            )
        })
    }
}

fn lock(variable: &Mutex<Tensor>) -> MutexGuard<'_, Tensor> {
    variable.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    fn request(name: &str, op: Op, values: &[f32], learning_rate: f64) -> VariableRequest {
        let meta = TensorMeta {
            dtype: proto::DataType::DtFloat,
            shape: vec![values.len() as u64],
        };
        let data = Bytes::copy_from_slice(bytemuck::cast_slice(values));
        VariableRequest {
            name: name.into(),
            op: op as i32,
            value: Some(wire::tensor_proto(&meta, data)),
            learning_rate,
        }
    }

    fn read(variables: &Variables, name: &str) -> Result<Vec<f32>> {
        let response = variables.apply(VariableRequest {
            name: name.into(),
            ..Default::default()
        })?;
        let (_, data) = wire::from_tensor_proto(response.value.unwrap())?;
        Ok(data
            .chunks_exact(4)
            .map(bytemuck::pod_read_unaligned)
            .collect())
    }

    #[test]
    fn create_update_and_read() {
        let variables = Variables::new(TaskId::new("ps", 0), &ServerConfig::default());
        variables
            .apply(request("w", Op::Create, &[1.0, 2.0], 0.0))
            .unwrap();
        let again = variables.apply(request("w", Op::Create, &[0.0, 0.0], 0.0));
        assert_eq!(again.unwrap_err().code, Code::AlreadyExists);
        variables
            .apply(request("w", Op::AssignAdd, &[1.0, 1.0], 0.0))
            .unwrap();
        variables
            .apply(request("w", Op::SgdStep, &[4.0, -4.0], 0.25))
            .unwrap();
        assert_eq!(read(&variables, "w").unwrap(), [1.0, 4.0]);
        variables
            .apply(request("w", Op::Assign, &[7.0, 8.0], 0.0))
            .unwrap();
        assert_eq!(read(&variables, "w").unwrap(), [7.0, 8.0]);
    }

    #[test]
    fn mismatches_and_unknown_names_are_refused() {
        let variables = Variables::new(TaskId::new("ps", 0), &ServerConfig::default());
        assert_eq!(read(&variables, "nope").unwrap_err().code, Code::NotFound);
        variables
            .apply(request("w", Op::Create, &[1.0], 0.0))
            .unwrap();
        let wrong = variables.apply(request("w", Op::Assign, &[1.0, 2.0], 0.0));
        assert_eq!(wrong.unwrap_err().code, Code::InvalidArgument);
        assert_eq!(read(&variables, "w").unwrap(), [1.0]);
    }

    #[test]
    fn hosted_variables_are_held_to_the_budget() {
        let config = ServerConfig {
            max_pending_bytes: 3 * (TENSOR_OVERHEAD_BYTES + 1 + 400),
            ..ServerConfig::default()
        };
        let variables = Variables::new(TaskId::new("ps", 0), &config);
        for name in ["a", "b", "c"] {
            variables
                .apply(request(name, Op::Create, &[0.0; 100], 0.0))
                .unwrap();
        }
        let refused = variables
            .apply(request("d", Op::Create, &[], 0.0))
            .unwrap_err();
        assert_eq!(refused.code, Code::ResourceExhausted);
        assert!(
            refused.message.contains("max_pending_bytes"),
            "{}",
            refused.message
        );
        // Those it holds are still served.
        variables
            .apply(request("a", Op::AssignAdd, &[1.0; 100], 0.0))
            .unwrap();
        assert_eq!(read(&variables, "a").unwrap(), vec![1.0; 100]);
    }
}
