//! Parameter-server variables: named tensors a task hosts, which any task reads and updates.
//!
//! Updates are applied on the host, in Rust, under the variable's own lock, so concurrent
//! updates from many workers are atomic per variable and never lost; different variables do not
//! wait for each other. A task reaches a variable it hosts directly and another task's through
//! the `VariableOp` RPC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::cluster::TaskId;
use crate::codec::{self, Tensor, TensorBuf};
use crate::errors::{Code, Error, Result};
use crate::peers::Peers;
use crate::proto::variable_request::Op;
use crate::proto::worker_client::WorkerClient;
use crate::proto::{VariableRequest, VariableResponse};
use crate::reduce::{self, ReduceOp};

/// The variables one task hosts.
#[derive(Default)]
pub struct Variables {
    by_name: Mutex<HashMap<String, Arc<Mutex<Tensor>>>>,
}

impl Variables {
    /// Applies one request to the variables hosted here.
    pub fn apply(&self, request: VariableRequest) -> Result<VariableResponse> {
        let op = Op::try_from(request.op)
            .map_err(|_| Error::invalid_argument(format!("unknown variable op {}", request.op)))?;
        let name = request.name;
        if op == Op::Read {
            let value = self.read(&name)?;
            return Ok(VariableResponse {
                value: Some(codec::tensor_proto(
                    &value.meta,
                    Bytes::from_owner(value.data),
                )),
            });
        }
        let value = request
            .value
            .ok_or_else(|| Error::invalid_argument(format!("{op:?} of {name:?} needs a value")))?;
        let (meta, data) = codec::from_tensor_proto(value)?;
        if op == Op::Create {
            let mut by_name = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
            if by_name.contains_key(&name) {
                return Err(Error::new(
                    Code::AlreadyExists,
                    format!("variable {name:?} already exists"),
                ));
            }
            let variable = Tensor {
                meta,
                data: TensorBuf::from_slice(&data),
            };
            by_name.insert(name, Arc::new(Mutex::new(variable)));
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
                reduce::combine(ReduceOp::Sum, dtype, current, &data);
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
        let by_name = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        by_name.get(name).cloned().ok_or_else(|| {
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

/// Applies `request` to the variable `host` has: here, or through that task's server. A read
/// gives the value, copied once here (into an aligned buffer) whichever task holds it.
pub async fn call(
    host: &TaskId,
    request: VariableRequest,
    local: &Variables,
    me: &TaskId,
    peers: &Peers,
    max_message_bytes: usize,
) -> Result<Option<Tensor>> {
    let what = format!(
        "{:?} of variable {:?} on {host}",
        request.op(),
        request.name
    );
    if host == me {
        let done = if request.op() == Op::Read {
            local.read(&request.name).map(Some)
        } else {
            local.apply(request).map(|_| None)
        };
        return done.map_err(|e| e.context(what));
    }
    peers.cluster().require(host)?;
    let channel = peers.channel(host).await?;
    let response = WorkerClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
        .variable_op(request)
        .await
        .map_err(|status| Error::from(status).context(what))?;
    let Some(value) = response.into_inner().value else {
        return Ok(None);
    };
    let (meta, data) = codec::from_tensor_proto(value)?;
    Ok(Some(Tensor {
        meta,
        data: TensorBuf::from_slice(&data),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::TensorMeta;
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
            value: Some(codec::tensor_proto(&meta, data)),
            learning_rate,
        }
    }

    fn read(variables: &Variables, name: &str) -> Result<Vec<f32>> {
        let response = variables.apply(VariableRequest {
            name: name.into(),
            ..Default::default()
        })?;
        let (_, data) = codec::from_tensor_proto(response.value.unwrap())?;
        Ok(data
            .chunks_exact(4)
            .map(bytemuck::pod_read_unaligned)
            .collect())
    }

    #[test]
    fn create_update_and_read() {
        let variables = Variables::default();
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
        let variables = Variables::default();
        assert_eq!(read(&variables, "nope").unwrap_err().code, Code::NotFound);
        variables
            .apply(request("w", Op::Create, &[1.0], 0.0))
            .unwrap();
        let wrong = variables.apply(request("w", Op::Assign, &[1.0, 2.0], 0.0));
        assert_eq!(wrong.unwrap_err().code, Code::InvalidArgument);
        assert_eq!(read(&variables, "w").unwrap(), [1.0]);
    }
}
