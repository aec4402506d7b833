//! The cluster model: jobs of tasks with addresses, task names, and the one address parser.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv6Addr;

use prost::Message;

use crate::base::errors::{Error, Result};
use crate::proto;

/// A task of the cluster, written `/job:<job>/task:<index>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId {
    pub job: String,
    pub index: u32,
}

impl TaskId {
    pub fn new(job: impl Into<String>, index: u32) -> Self {
        Self {
            job: job.into(),
            index,
        }
    }

    /// Parses `/job:ps/task:0`, also with TensorFlow's `/replica:0/` in between.
    pub fn parse(name: &str) -> Result<Self> {
        let bad = || {
            Error::invalid_argument(format!(
                "{name:?} is not a task name like \"/job:worker/task:0\""
            ))
        };
        let rest = name.strip_prefix("/job:").ok_or_else(bad)?;
        let (job, rest) = rest.split_once('/').ok_or_else(bad)?;
        let rest = rest.strip_prefix("replica:0/").unwrap_or(rest);
        let index = rest.strip_prefix("task:").ok_or_else(bad)?;
        if job.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(Self::new(job, index.parse().map_err(|_| bad())?))
    }

    /// TensorFlow's device-name prefix of this task: `/job:<job>/replica:0/task:<index>`.
    pub fn device_prefix(&self) -> String {
        format!("/job:{}/replica:0/task:{}", self.job, self.index)
    }

    pub fn to_proto(&self) -> proto::TaskId {
        proto::TaskId {
            job: self.job.clone(),
            index: self.index as i32,
        }
    }

    pub fn from_proto(task: &proto::TaskId) -> Result<Self> {
        let index = u32::try_from(task.index)
            .map_err(|_| Error::invalid_argument(format!("negative task index {}", task.index)))?;
        Ok(Self::new(task.job.clone(), index))
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/job:{}/task:{}", self.job, self.index)
    }
}

/// Splits `host:port` (IPv6 hosts in brackets: `[::1]:2222`) into the host to connect or bind
/// to (brackets removed) and the port.
pub fn parse_address(address: &str) -> Result<(String, u16)> {
    let bad = |why: &str| Error::invalid_argument(format!("invalid address {address:?}: {why}"));
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("the port must be a number"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port must be at most 65535"))?;
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| bad("unclosed '[' in IPv6 host"))?;
        inner
            .parse::<Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address in brackets"))?;
        return Ok((inner.to_owned(), port));
    }
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    if host.contains(':') {
        return Err(bad(
            "IPv6 hosts must be written in brackets, e.g. [::1]:2222",
        ));
    }
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if !host.chars().all(valid_char) {
        return Err(bad("the host has characters a host name cannot have"));
    }
    Ok((host.to_owned(), port))
}

/// Formats a host and port as an address, bracketing IPv6 hosts.
pub fn format_address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Job name -> task index -> address. Jobs and indices are kept sorted, as TensorFlow lists them.
pub type Jobs = BTreeMap<String, BTreeMap<u32, String>>;

/// The tasks of a training cluster and where each one listens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    jobs: Jobs,
}

impl Cluster {
    /// Validates every address; an empty job name is refused.
    pub fn new(jobs: Jobs) -> Result<Self> {
        for (job, tasks) in &jobs {
            if job.is_empty() {
                return Err(Error::invalid_argument("a job name cannot be empty"));
            }
            for (index, address) in tasks {
                parse_address(address).map_err(|e| e.context(TaskId::new(job.clone(), *index)))?;
            }
        }
        Ok(Self { jobs })
    }

    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    pub fn address(&self, task: &TaskId) -> Option<&str> {
        self.jobs
            .get(&task.job)?
            .get(&task.index)
            .map(String::as_str)
    }

    /// Every task, in job then index order.
    pub fn tasks(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.jobs
            .iter()
            .flat_map(|(job, tasks)| tasks.keys().map(|index| TaskId::new(job.clone(), *index)))
    }

    /// The address of `task`, or an `InvalidArgument` naming the task.
    pub fn require(&self, task: &TaskId) -> Result<&str> {
        self.address(task).ok_or_else(|| {
            Error::invalid_argument(format!("task {task} is not in the cluster spec"))
        })
    }

    /// Replaces the address of `task` (e.g. once port 0 is bound to a real port).
    pub fn with_address(mut self, task: &TaskId, address: String) -> Self {
        self.jobs
            .entry(task.job.clone())
            .or_default()
            .insert(task.index, address);
        self
    }

    pub fn to_proto(&self) -> proto::ClusterDef {
        proto::ClusterDef {
            job: self
                .jobs
                .iter()
                .map(|(name, tasks)| proto::JobDef {
                    name: name.clone(),
                    tasks: tasks
                        .iter()
                        .map(|(index, address)| (*index as i32, address.clone()))
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn from_proto(cluster: &proto::ClusterDef) -> Result<Self> {
        let mut jobs = Jobs::new();
        for job in &cluster.job {
            if jobs.contains_key(&job.name) {
                return Err(Error::invalid_argument(format!(
                    "job {:?} appears twice in the ClusterDef",
                    job.name
                )));
            }
            let mut tasks = BTreeMap::new();
            for (index, address) in &job.tasks {
                let index = u32::try_from(*index).map_err(|_| {
                    Error::invalid_argument(format!("job {:?} has negative task index", job.name))
                })?;
                tasks.insert(index, address.clone());
            }
            jobs.insert(job.name.clone(), tasks);
        }
        Self::new(jobs)
    }
}

/// What a server is: its cluster, its own task, and the protocol it speaks. TensorFlow's
/// `ServerDef` carries the same, under the same field numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerDef {
    pub cluster: Cluster,
    pub task: TaskId,
    pub protocol: String,
    /// Non-zero: the port bound, which overrides the one in the cluster address.
    pub port: u16,
}

impl ServerDef {
    pub fn encode(&self) -> Vec<u8> {
        proto::ServerDef {
            cluster: Some(self.cluster.to_proto()),
            job_name: self.task.job.clone(),
            task_index: self.task.index as i32,
            protocol: self.protocol.clone(),
            port: i32::from(self.port),
        }
        .encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let def = proto::ServerDef::decode(bytes)?;
        let task_index = u32::try_from(def.task_index)
            .map_err(|_| Error::invalid_argument("the ServerDef has a negative task_index"))?;
        let port = u16::try_from(def.port)
            .map_err(|_| Error::invalid_argument(format!("port {} is out of range", def.port)))?;
        Ok(Self {
            cluster: Cluster::from_proto(&def.cluster.unwrap_or_default())?,
            task: TaskId::new(def.job_name, task_index),
            protocol: def.protocol,
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_reject() {
        assert_eq!(
            parse_address("localhost:2222").unwrap(),
            ("localhost".into(), 2222)
        );
        assert_eq!(parse_address("[::1]:0").unwrap(), ("::1".into(), 0));
        assert_eq!(format_address("::1", 80), "[::1]:80");
        for bad in [
            "", "host", "host:", ":80", "::1:80", "[::1:80", "[zz]:1", "h:65536", "a/b:1",
        ] {
            assert_eq!(
                parse_address(bad).unwrap_err().code,
                crate::base::errors::Code::InvalidArgument,
                "{bad}"
            );
        }
    }

    #[test]
    fn task_names_parse_both_spellings() {
        let task = TaskId::new("ps", 3);
        assert_eq!(TaskId::parse("/job:ps/task:3").unwrap(), task);
        assert_eq!(TaskId::parse("/job:ps/replica:0/task:3").unwrap(), task);
        assert_eq!(task.to_string(), "/job:ps/task:3");
        for bad in ["ps:3", "/job:/task:1", "/job:ps/task:x", "/job:ps/task:-1"] {
            assert!(TaskId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_def_round_trips_with_sparse_jobs() {
        let jobs = Jobs::from([
            ("ps".into(), BTreeMap::from([(0, "h:1".into())])),
            (
                "worker".into(),
                BTreeMap::from([(1, "h:2".into()), (7, "[::1]:3".into())]),
            ),
        ]);
        let def = ServerDef {
            cluster: Cluster::new(jobs).unwrap(),
            task: TaskId::new("worker", 7),
            protocol: "grpc".into(),
            port: 3,
        };
        assert_eq!(ServerDef::decode(&def.encode()).unwrap(), def);
        assert!(ServerDef::decode(b"\xff\xff").is_err());
    }

    #[test]
    fn cluster_refuses_bad_addresses_naming_the_task() {
        let jobs = Jobs::from([("w".into(), BTreeMap::from([(2, "nope".into())]))]);
        let error = Cluster::new(jobs).unwrap_err();
        assert!(error.message.contains("/job:w/task:2"), "{error}");
    }
}
