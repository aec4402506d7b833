//! The one GetStatus client: what a server says about itself, asked through distsrv's Worker or,
//! where that service is missing (a stock TensorFlow server), through TensorFlow's WorkerService.

use tonic::Request;
use tonic_prost::ProstCodec;

use super::auth::PeerChannel;
use crate::base::cluster::TaskId;
use crate::base::errors::{Code, Error, Result};
use crate::proto::worker_client::WorkerClient;
use crate::proto::{self, DeviceAttributes};
use crate::tfproto;

/// TensorFlow's GetStatus, at the path its runtime calls (registered by hand, without `.grpc`).
pub const TF_GET_STATUS_PATH: &str = "/tensorflow.WorkerService/GetStatus";

/// What a task says about itself.
#[derive(Debug, Clone)]
pub struct TaskStatus {
    /// The task as it names itself (a TensorFlow server: in its devices' names).
    pub task: Option<TaskId>,
    /// New at every start of the task: distsrv's, or a TensorFlow server's first device's.
    pub incarnation: u64,
    /// distsrv's version; `None` for a TensorFlow server.
    pub version: Option<String>,
    pub devices: Vec<DeviceAttributes>,
    /// The collectives it gave up lately (see `GetStatusResponse.abandoned_collectives`).
    pub abandoned_collectives: Vec<u64>,
}

/// Asks the server behind `channel` for its status.
pub async fn get_status(channel: PeerChannel) -> Result<TaskStatus> {
    let reply = WorkerClient::new(channel.clone())
        .get_status(proto::GetStatusRequest {})
        .await;
    match reply {
        Ok(reply) => {
            let reply = reply.into_inner();
            Ok(TaskStatus {
                task: reply.task.as_ref().map(TaskId::from_proto).transpose()?,
                incarnation: reply.incarnation,
                version: Some(reply.version),
                devices: reply.device_attributes,
                abandoned_collectives: reply.abandoned_collectives,
            })
        }
        Err(status) if status.code() == Code::Unimplemented => {
            let devices = tensorflow_status(channel).await?.device_attributes;
            Ok(TaskStatus {
                task: devices.first().and_then(|d| task_of_device(&d.name)),
                incarnation: devices.first().map_or(0, |d| d.incarnation),
                version: None,
                devices,
                abandoned_collectives: Vec::new(),
            })
        }
        Err(status) => Err(status.into()),
    }
}

/// Asks the server behind `channel` for its devices as TensorFlow does, at TensorFlow's path.
pub async fn tensorflow_status(channel: PeerChannel) -> Result<tfproto::GetStatusResponse> {
    let mut client = tonic::client::Grpc::new(channel);
    client
        .ready()
        .await
        .map_err(|e| Error::unavailable(format!("the connection is not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static(TF_GET_STATUS_PATH);
    let reply = client
        .unary(
            Request::new(tfproto::GetStatusRequest {}),
            path,
            ProstCodec::default(),
        )
        .await?;
    Ok(reply.into_inner())
}

/// The task of a device name: `/job:ps/task:0` of `/job:ps/replica:0/task:0/device:CPU:0`.
pub fn task_of_device(name: &str) -> Option<TaskId> {
    let (prefix, _) = name.split_once("/device:")?;
    TaskId::parse(prefix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_name_names_its_task() {
        let name = "/job:worker/replica:0/task:2/device:GPU:1";
        assert_eq!(task_of_device(name), Some(TaskId::new("worker", 2)));
        assert_eq!(task_of_device("/device:CPU:0"), None);
        assert_eq!(task_of_device("nonsense"), None);
    }
}
