//! The crate's one error type: a gRPC status code and a message.
//!
//! Every layer reports failures as [`Error`]; the code travels unchanged to peers as a
//! `tonic::Status` and to Python as the `distsrv.errors` class of the same code. A failure that
//! happened on a peer also says where (`task`) and, for an exception raised by a remote
//! operation's handler, the exception's type name; both travel in the status's metadata.

use std::fmt;

pub use tonic::Code;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub message: String,
    /// The task where the failure happened, when that was a peer.
    pub task: Option<String>,
    /// The type name of the exception a remote operation's handler raised, e.g. "ValueError".
    pub exception_type: Option<String>,
}

/// Status metadata carrying [`Error::task`] and [`Error::exception_type`].
const TASK_KEY: &str = "distsrv-error-task";
const TYPE_KEY: &str = "distsrv-error-type";

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            task: None,
            exception_type: None,
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, message)
    }

    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        Self::new(Code::DeadlineExceeded, message)
    }

    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }

    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Self::new(Code::ResourceExhausted, message)
    }

    pub fn data_loss(message: impl Into<String>) -> Self {
        Self::new(Code::DataLoss, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(Code::Cancelled, message)
    }

    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(Code::Unimplemented, message)
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, message)
    }

    /// Prefixes the message with what was being done, keeping the rest.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Self {
            message: format!("{what}: {}", self.message),
            ..self
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let mut status = tonic::Status::new(error.code, error.message);
        for (key, value) in [(TASK_KEY, error.task), (TYPE_KEY, error.exception_type)] {
            if let Some(value) = value {
                let value = percent_encode(&value)
                    .parse()
                    .expect("percent-encoded text is a valid header value");
                status.metadata_mut().insert(key, value);
            }
        }
        status
    }
}

/// `work`, or DEADLINE_EXCEEDED ("`what` within ...s") if `limit` passes first.
pub async fn within<T>(
    limit: Option<std::time::Duration>,
    what: impl fmt::Display,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    let Some(limit) = limit else {
        return work.await;
    };
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(Error::deadline_exceeded(format!(
            "{what} within {:.3}s",
            limit.as_secs_f64()
        )))
    })
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let read = |key| {
            let value = status.metadata().get(key)?.to_str().ok()?;
            Some(percent_decode(value))
        };
        Self {
            task: read(TASK_KEY),
            exception_type: read(TYPE_KEY),
            ..Self::new(status.code(), status.message())
        }
    }
}

/// Metadata values are visible ASCII: other bytes (spaces and `%` too) are written `%XX`, as
/// gRPC writes grpc-message.
fn percent_encode(text: &str) -> String {
    use fmt::Write;
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (b'!'..=b'~').contains(&byte) && byte != b'%' {
            encoded.push(byte as char);
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

fn percent_decode(text: &str) -> String {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        let escaped = tail
            .get(..2)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(decoded) if byte == b'%' => {
                bytes.push(decoded);
                rest = &tail[2..];
            }
            _ => {
                bytes.push(byte);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

impl From<prost::DecodeError> for Error {
    fn from(error: prost::DecodeError) -> Self {
        Self::invalid_argument(format!("malformed message: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_keeps_code_and_message() {
        let error = Error::deadline_exceeded("too slow").context("recv x");
        let status = tonic::Status::from(error.clone());
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(Error::from(status), error);
        assert_eq!(error.to_string(), "recv x: too slow");
    }

    #[test]
    fn origin_travels_in_metadata_whatever_its_characters() {
        let error = Error {
            task: Some("/job:w/task:1".to_owned()),
            exception_type: Some("módulo.Fehler 100%".to_owned()),
            ..Error::new(Code::Unknown, "boom")
        };
        let status = tonic::Status::from(error.clone());
        assert_eq!(
            status.metadata().get(TYPE_KEY).unwrap(),
            "m%C3%B3dulo.Fehler%20100%25"
        );
        assert_eq!(Error::from(status), error);
        assert_eq!(percent_decode("50%"), "50%");
    }
}
