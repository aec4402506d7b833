//! Parameter-server variables: named tensors a task hosts, which any task reads and updates.
//!
//! Updates are applied on the host, in Rust, under the variable's own lock, so concurrent
//! updates from many workers are atomic per variable and never lost; different variables do not
//! wait for each other. Optimizer steps (SGD, with momentum, Adam) keep their state beside the
//! variable, on the host, so a worker sends only its gradient. An update of another dtype is
//! cast to the variable's where numpy's same_kind rule allows (a float64 gradient into a float32
//! variable). A task reaches a variable it hosts directly and another task's through the
//! `VariableOp` RPC.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytemuck::Pod;
use bytes::Bytes;

use crate::base::cluster::TaskId;
use crate::base::config::ServerConfig;
use crate::base::errors::{Code, Error, Result};
use crate::inbox::TENSOR_OVERHEAD_BYTES;
use crate::proto::variable_request::Op;
use crate::proto::worker_client::WorkerClient;
use crate::proto::{DataType, VariableInfo, VariableRequest, VariableResponse};
use crate::tensor::reduce::{self, ReduceOp};
use crate::tensor::{Tensor, TensorBuf, TensorMeta, cast, dtype_name};
use crate::transport::Peers;
use crate::wire;

/// The variables one task hosts, and its way to those of other tasks.
pub struct Variables {
    me: TaskId,
    max_message_bytes: usize,
    by_name: Mutex<HashMap<String, Arc<Hosted>>>,
    /// What the hosted variables hold, with their names, optimizer state and bookkeeping.
    bytes: AtomicU64,
    /// What they may hold in all: `max_pending_bytes`, a budget of their own.
    max_bytes: u64,
}

/// One hosted variable and what it costs the budget.
struct Hosted {
    variable: Mutex<Variable>,
    cost: AtomicU64,
}

struct Variable {
    value: Tensor,
    state: Option<State>,
    /// Set once the variable is deleted, for an update that found it just before.
    deleted: bool,
}

/// What an optimizer keeps between steps, in the variable's dtype.
enum State {
    Momentum {
        buf: TensorBuf,
    },
    Adam {
        m: TensorBuf,
        v: TensorBuf,
        steps: u64,
    },
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Momentum { .. } => "momentum",
            State::Adam { .. } => "Adam",
        }
    }
}

/// The hyperparameters of an optimizer step, those its op uses.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Step {
    pub learning_rate: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
}

/// What an operation on a variable gives back.
pub enum Reply {
    Done,
    /// READ's value.
    Value(Tensor),
    /// DESCRIBE's dtype and shape.
    Described(TensorMeta),
    /// LIST's variables, by name.
    Listed(Vec<(String, TensorMeta)>),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Done => f.write_str("Done"),
            Reply::Value(tensor) => write!(f, "Value({})", tensor.meta),
            Reply::Described(meta) => write!(f, "Described({meta})"),
            Reply::Listed(variables) => write!(f, "Listed({} variables)", variables.len()),
        }
    }
}

impl Reply {
    fn into_response(self) -> VariableResponse {
        let described = |meta: &TensorMeta| wire::tensor_proto(meta, Bytes::new());
        match self {
            Reply::Done => VariableResponse::default(),
            Reply::Value(tensor) => VariableResponse {
                value: Some(wire::tensor_proto(
                    &tensor.meta,
                    Bytes::from_owner(tensor.data),
                )),
                ..Default::default()
            },
            Reply::Described(meta) => VariableResponse {
                value: Some(described(&meta)),
                ..Default::default()
            },
            Reply::Listed(variables) => VariableResponse {
                variables: variables
                    .into_iter()
                    .map(|(name, meta)| VariableInfo {
                        name,
                        description: Some(described(&meta)),
                    })
                    .collect(),
                ..Default::default()
            },
        }
    }

    /// The reply to `op` a host sent as `response`.
    fn from_response(op: Op, response: VariableResponse) -> Result<Self> {
        let missing = || Error::internal(format!("the host's answer to {op:?} holds no value"));
        Ok(match op {
            Op::Read => {
                let (meta, data) = wire::from_tensor_proto(response.value.ok_or_else(missing)?)?;
                Reply::Value(Tensor {
                    meta,
                    data: TensorBuf::from_slice(&data),
                })
            }
            Op::Describe => {
                Reply::Described(wire::described(&response.value.ok_or_else(missing)?)?)
            }
            Op::List => Reply::Listed(
                response
                    .variables
                    .into_iter()
                    .map(|info| {
                        let meta = wire::described(&info.description.ok_or_else(missing)?)?;
                        Ok((info.name, meta))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => Reply::Done,
        })
    }
}

/// An operation on a variable: "read", "create", "assign", "assign_add", "sgd_step", "delete",
/// "describe", "momentum_step", "adam_step" or "list".
pub fn parse_op(name: &str) -> Result<Op> {
    Op::from_str_name(&name.to_uppercase())
        .ok_or_else(|| Error::invalid_argument(format!("unknown variable op {name:?}")))
}

impl Variables {
    pub fn new(me: TaskId, config: &ServerConfig) -> Self {
        Self {
            me,
            max_message_bytes: config.max_message_bytes,
            by_name: Mutex::default(),
            bytes: AtomicU64::new(0),
            max_bytes: config.max_pending_bytes,
        }
    }

    /// Applies `op` to variable `name` hosted on `host` (this task, or another over `peers`),
    /// with `value` and the `step`'s hyperparameters where the op takes them.
    pub async fn call(
        &self,
        peers: &Peers,
        host: &TaskId,
        name: String,
        op: Op,
        value: Option<(TensorMeta, Bytes)>,
        step: Step,
    ) -> Result<Reply> {
        let request = VariableRequest {
            name,
            op: op as i32,
            value: value.map(|(meta, data)| wire::tensor_proto(&meta, data)),
            learning_rate: step.learning_rate,
            momentum: step.momentum,
            nesterov: step.nesterov,
            beta1: step.beta1,
            beta2: step.beta2,
            epsilon: step.epsilon,
        };
        let what = if op == Op::List {
            format!("{op:?} of the variables on {host}")
        } else {
            format!("{op:?} of variable {:?} on {host}", request.name)
        };
        if *host == self.me {
            return self.apply(request).map_err(|e| e.context(what));
        }
        peers.cluster().require(host)?;
        let channel = peers.channel(host).await?;
        let response = WorkerClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
            .variable_op(request)
            .await
            .map_err(|status| Error::from(status).context(what))?;
        Reply::from_response(op, response.into_inner())
    }

    /// Serves one VariableOp on the variables this task hosts.
    pub fn serve(&self, request: VariableRequest) -> Result<VariableResponse> {
        self.apply(request).map(Reply::into_response)
    }

    fn apply(&self, request: VariableRequest) -> Result<Reply> {
        let op = Op::try_from(request.op)
            .map_err(|_| Error::invalid_argument(format!("unknown variable op {}", request.op)))?;
        let step = Step {
            learning_rate: request.learning_rate,
            momentum: request.momentum,
            nesterov: request.nesterov,
            beta1: request.beta1,
            beta2: request.beta2,
            epsilon: request.epsilon,
        };
        let VariableRequest { name, value, .. } = request;
        let name = &name;
        match op {
            Op::Read => return self.read(name).map(Reply::Value),
            Op::Describe => {
                let hosted = self.get(name)?;
                return Ok(Reply::Described(lock(&hosted).value.meta.clone()));
            }
            Op::List => return Ok(Reply::Listed(self.list())),
            Op::Delete => return self.delete(name).map(|_| Reply::Done),
            _ => {}
        }
        let value = value
            .ok_or_else(|| Error::invalid_argument(format!("{op:?} of {name:?} needs a value")))?;
        let (meta, data) = wire::from_tensor_proto(value)?;
        if op == Op::Create {
            return self.create(name, meta, &data).map(|_| Reply::Done);
        }
        let hosted = self.get(name)?;
        let mut variable = lock(&hosted);
        if variable.deleted {
            return Err(not_found(name));
        }
        let value_meta = variable.value.meta.clone();
        if value_meta.shape != meta.shape {
            return Err(Error::invalid_argument(format!(
                "variable {name:?} is {value_meta}, the update is {meta}"
            )));
        }
        let cast;
        let data: &[u8] = if meta.dtype == value_meta.dtype {
            &data
        } else {
            cast = cast::cast(meta.dtype, &data, value_meta.dtype).map_err(|e| {
                e.context(format!(
                    "an update of variable {name:?}, which is {value_meta}"
                ))
            })?;
            cast.as_slice()
        };
        let dtype = value_meta.dtype;
        match op {
            Op::Assign => variable.value.data.as_mut_slice().copy_from_slice(data),
            Op::AssignAdd => {
                ReduceOp::Sum.check(dtype)?;
                reduce::combine(
                    ReduceOp::Sum,
                    dtype,
                    variable.value.data.as_mut_slice(),
                    data,
                )?;
            }
            Op::SgdStep => reduce::add_scaled(
                dtype,
                variable.value.data.as_mut_slice(),
                data,
                -step.learning_rate,
            )?,
            Op::MomentumStep | Op::AdamStep => {
                step.check(op)?;
                let optimizer = if op == Op::MomentumStep {
                    "momentum"
                } else {
                    "Adam"
                };
                if !matches!(dtype, DataType::DtFloat | DataType::DtDouble) {
                    return Err(Error::invalid_argument(format!(
                        "{optimizer} steps need a float32 or float64 variable; {name:?} is {}",
                        dtype_name(dtype)
                    )));
                }
                self.ensure_state(&hosted, &mut variable, op)?;
                optimize(&mut variable, data, step);
            }
            Op::Read | Op::Create | Op::Delete | Op::Describe | Op::List => {
                unreachable!("handled above")
            }
        }
        Ok(Reply::Done)
    }

    fn create(&self, name: &str, meta: TensorMeta, data: &[u8]) -> Result<()> {
        let mut by_name = self.variables();
        if by_name.contains_key(name) {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("variable {name:?} already exists"),
            ));
        }
        // A held tensor's bookkeeping too, so that empty variables count.
        let cost = (data.len() as u64)
            .saturating_add(name.len() as u64)
            .saturating_add(TENSOR_OVERHEAD_BYTES);
        self.charge(cost)?;
        let variable = Variable {
            value: Tensor {
                meta,
                data: TensorBuf::from_slice(data),
            },
            state: None,
            deleted: false,
        };
        let hosted = Hosted {
            variable: Mutex::new(variable),
            cost: AtomicU64::new(cost),
        };
        by_name.insert(name.to_owned(), Arc::new(hosted));
        Ok(())
    }

    fn delete(&self, name: &str) -> Result<()> {
        let hosted = self
            .variables()
            .remove(name)
            .ok_or_else(|| not_found(name))?;
        // Under the variable's lock no update is charging for state meanwhile, and none after.
        lock(&hosted).deleted = true;
        self.bytes
            .fetch_sub(hosted.cost.load(Ordering::Acquire), Ordering::AcqRel);
        Ok(())
    }

    /// Gives `variable` the state `op`'s optimizer keeps, charged to the budget, the first time.
    fn ensure_state(&self, hosted: &Hosted, variable: &mut Variable, op: Op) -> Result<()> {
        let wanted = if op == Op::MomentumStep {
            "momentum"
        } else {
            "Adam"
        };
        if let Some(state) = &variable.state {
            if state.name() == wanted {
                return Ok(());
            }
            return Err(Error::new(
                Code::FailedPrecondition,
                format!(
                    "the variable is stepped with {}; a {wanted} step needs its own state (delete                      and create the variable to switch)",
                    state.name()
                ),
            ));
        }
        let len = variable.value.data.len();
        let zeroed = || {
            let mut buf = TensorBuf::new(len);
            buf.as_mut_slice().fill(0);
            buf
        };
        let (state, bytes) = if op == Op::MomentumStep {
            (State::Momentum { buf: zeroed() }, len as u64)
        } else {
            let (m, v) = (zeroed(), zeroed());
            (State::Adam { m, v, steps: 0 }, 2 * len as u64)
        };
        self.charge(bytes)?;
        hosted.cost.fetch_add(bytes, Ordering::AcqRel);
        variable.state = Some(state);
        Ok(())
    }

    /// Counts `bytes` more against the budget, or refuses them.
    fn charge(&self, bytes: u64) -> Result<()> {
        let limit = self.max_bytes;
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|total| *total <= limit)
            })
            .map(drop)
            .map_err(|held| {
                Error::resource_exhausted(format!(
                    "this task hosts {held} bytes of variables (with their names, optimizer                      state and {TENSOR_OVERHEAD_BYTES} bytes each for bookkeeping); {bytes} more                      would pass its limit of {limit} (max_pending_bytes)"
                ))
            })
    }

    /// A copy of the variable's current value.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let hosted = self.get(name)?;
        let variable = lock(&hosted);
        Ok(Tensor {
            meta: variable.value.meta.clone(),
            data: TensorBuf::from_slice(variable.value.data.as_slice()),
        })
    }

    /// Every hosted variable's name, dtype and shape, by name.
    fn list(&self) -> Vec<(String, TensorMeta)> {
        let hosted: Vec<_> = self
            .variables()
            .iter()
            .map(|(name, hosted)| (name.clone(), Arc::clone(hosted)))
            .collect();
        let mut listed: Vec<_> = hosted
            .into_iter()
            .map(|(name, hosted)| (name, lock(&hosted).value.meta.clone()))
            .collect();
        listed.sort_by(|a, b| a.0.cmp(&b.0));
        listed
    }

    fn get(&self, name: &str) -> Result<Arc<Hosted>> {
        self.variables()
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))
    }

    fn variables(&self) -> MutexGuard<'_, HashMap<String, Arc<Hosted>>> {
        self.by_name.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Step {
    /// Refuses hyperparameters `op`'s optimizer is not defined for (as torch.optim refuses them).
    fn check(&self, op: Op) -> Result<()> {
        let refuse = |what: String| Err(Error::invalid_argument(what));
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return refuse(format!("invalid learning rate {}", self.learning_rate));
        }
        if op == Op::MomentumStep {
            if !(self.momentum.is_finite() && self.momentum >= 0.0) {
                return refuse(format!("invalid momentum {}", self.momentum));
            }
            if self.nesterov && self.momentum == 0.0 {
                return refuse("a Nesterov step needs a momentum".into());
            }
            return Ok(());
        }
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return refuse(format!("invalid {name} {beta}: it must be in [0, 1)"));
            }
        }
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            return refuse(format!("invalid epsilon {}", self.epsilon));
        }
        Ok(())
    }
}

/// One optimizer step of `variable` (float32 or float64, its state in place) with `gradient`.
fn optimize(variable: &mut Variable, gradient: &[u8], step: Step) {
    let dtype = variable.value.meta.dtype;
    let value = variable.value.data.as_mut_slice();
    match variable.state.as_mut().expect("ensured") {
        State::Momentum { buf } => match dtype {
            DataType::DtFloat => momentum::<f32>(value, buf.as_mut_slice(), gradient, step),
            _ => momentum::<f64>(value, buf.as_mut_slice(), gradient, step),
        },
        State::Adam { m, v, steps } => {
            *steps += 1;
            let (m, v) = (m.as_mut_slice(), v.as_mut_slice());
            match dtype {
                DataType::DtFloat => adam::<f32>(value, m, v, gradient, *steps, step),
                _ => adam::<f64>(value, m, v, gradient, *steps, step),
            }
        }
    }
}

/// A float an optimizer computes with, in f64.
trait Real: Pod {
    fn get(self) -> f64;
    fn set(value: f64) -> Self;
}

impl Real for f32 {
    fn get(self) -> f64 {
        f64::from(self)
    }
    fn set(value: f64) -> Self {
        value as f32
    }
}

impl Real for f64 {
    fn get(self) -> f64 {
        self
    }
    fn set(value: f64) -> Self {
        value
    }
}

/// The gradient's elements; a caller's array need not be aligned.
fn elements<T: Real>(gradient: &[u8]) -> impl Iterator<Item = f64> + '_ {
    gradient
        .chunks_exact(size_of::<T>())
        .map(|bytes| bytemuck::pod_read_unaligned::<T>(bytes).get())
}

/// torch.optim.SGD's step with momentum (no dampening or weight decay).
fn momentum<T: Real>(value: &mut [u8], buf: &mut [u8], gradient: &[u8], step: Step) {
    let value: &mut [T] = bytemuck::cast_slice_mut(value);
    let buf: &mut [T] = bytemuck::cast_slice_mut(buf);
    for ((p, b), g) in value.iter_mut().zip(buf).zip(elements::<T>(gradient)) {
        let next = step.momentum * b.get() + g;
        *b = T::set(next);
        let update = if step.nesterov {
            g + step.momentum * next
        } else {
            next
        };
        *p = T::set(p.get() - step.learning_rate * update);
    }
}

/// torch.optim.Adam's `steps`th step (no weight decay or amsgrad).
fn adam<T: Real>(
    value: &mut [u8],
    m: &mut [u8],
    v: &mut [u8],
    gradient: &[u8],
    steps: u64,
    step: Step,
) {
    let value: &mut [T] = bytemuck::cast_slice_mut(value);
    let m: &mut [T] = bytemuck::cast_slice_mut(m);
    let v: &mut [T] = bytemuck::cast_slice_mut(v);
    let exponent = i32::try_from(steps).unwrap_or(i32::MAX);
    let first_bias = 1.0 - step.beta1.powi(exponent);
    let second_bias = 1.0 - step.beta2.powi(exponent);
    let elements = value.iter_mut().zip(m).zip(v).zip(elements::<T>(gradient));
    for (((p, m), v), g) in elements {
        let first = step.beta1 * m.get() + (1.0 - step.beta1) * g;
        let second = step.beta2 * v.get() + (1.0 - step.beta2) * g * g;
        *m = T::set(first);
        *v = T::set(second);
        let update = (first / first_bias) / ((second / second_bias).sqrt() + step.epsilon);
        *p = T::set(p.get() - step.learning_rate * update);
    }
}

fn not_found(name: &str) -> Error {
    Error::new(
        Code::NotFound,
        format!("no variable {name:?} (create it first)"),
    )
}

fn lock(hosted: &Hosted) -> MutexGuard<'_, Variable> {
    hosted.variable.lock().unwrap_or_else(|e| e.into_inner())
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
            ..Default::default()
        }
    }

    fn read(variables: &Variables, name: &str) -> Result<Vec<f32>> {
        let response = variables.serve(VariableRequest {
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
    fn a_deleted_variable_gives_its_bytes_and_state_back_to_the_budget() {
        let config = ServerConfig {
            max_pending_bytes: TENSOR_OVERHEAD_BYTES + 1 + 3 * 400,
            ..ServerConfig::default()
        };
        let variables = Variables::new(TaskId::new("ps", 0), &config);
        for _ in 0..3 {
            variables
                .apply(request("w", Op::Create, &[0.0; 100], 0.0))
                .unwrap();
            // Adam's two slots fill the budget; a second variable would not fit beside them.
            let mut adam = request("w", Op::AdamStep, &[1.0; 100], 0.1);
            (adam.beta1, adam.beta2, adam.epsilon) = (0.9, 0.999, 1e-8);
            variables.apply(adam).unwrap();
            let refused = variables.apply(request("x", Op::Create, &[], 0.0));
            assert_eq!(refused.unwrap_err().code, Code::ResourceExhausted);
            variables.apply(request("w", Op::Delete, &[], 0.0)).unwrap();
        }
        assert_eq!(variables.bytes.load(Ordering::Acquire), 0);
        assert_eq!(read(&variables, "w").unwrap_err().code, Code::NotFound);
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
