//! A unary gRPC call by hand, both ends, for messages that carry arrays and tensors: the
//! request's frames go from the caller's memory into HTTP/2 uncopied (see
//! [`crate::wire::frame_scattered`]), and the message that arrives, the answer at the caller or the
//! request at the server, is gathered into one aligned buffer where its arrays can stay
//! ([`Assembler`]). Everything else about the call is gRPC's: any gRPC client or server is the
//! other end.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use tonic::Status;
use tonic::body::Body;

use super::peers::Peers;
use super::stall;
use crate::base::cluster::TaskId;
use crate::base::errors::{Code, Error, Result};
use crate::base::security::AUTHORIZATION;
use crate::tensor::buf::Arrived;
use crate::wire::Assembler;

/// Calls method `path` of `to` with `frames` (one gRPC-framed message) over the push connection,
/// asking the peer to give up past `timeout`; the answer, at most `max_answer` bytes.
pub async fn post(
    peers: &Peers,
    to: &TaskId,
    path: &'static str,
    frames: Vec<Bytes>,
    timeout: Option<Duration>,
    max_answer: usize,
) -> Result<Arrived> {
    let (connection, uri) = peers.push_connection(to, path).await?;
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(uri)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    if let Some(authorization) = peers.security().authorization() {
        request = request.header(AUTHORIZATION, authorization.clone());
    }
    if let Some(timeout) = timeout {
        request = request.header("grpc-timeout", grpc_timeout(timeout));
    }
    let request = request
        .body(())
        .map_err(|e| Error::internal(format!("cannot build the request: {e}")))?;
    let mut requests = connection.requests.ready().await.map_err(broken)?;
    let (response, body) = requests.send_request(request, false).map_err(broken)?;
    let mut body = Outgoing(Some(body));
    // Every frame is queued before the connection next writes, so a small message's headers and
    // payload leave in one write. HTTP/2 holds what flow control does not let out yet: the
    // frames are slices of the caller's buffers, so holding them costs no memory.
    let last = frames.len().saturating_sub(1);
    let mut cut_short = None;
    for (index, frame) in frames.into_iter().enumerate() {
        if let Err(error) = body.stream().send_data(frame, index == last) {
            cut_short = Some(broken(error));
            break;
        }
    }
    // A server that refuses the request (say, its caller is not authenticated) answers and ends
    // the stream before taking it all: its answer says why, better than the cut stream.
    let response = match (response.await, cut_short) {
        (Ok(response), _) => response,
        (Err(error), None) => return Err(broken(error)),
        (Err(_), Some(cut_short)) => return Err(cut_short),
    };
    if let Some(status) = status_of(response.headers())
        && status.code() != Code::Ok
    {
        return Err(status.into());
    }
    let mut answer = response.into_body();
    let mut assembler = Assembler::new(max_answer);
    while let Some(data) = answer.data().await {
        let data = data.map_err(broken)?;
        let _ = answer.flow_control().release_capacity(data.len());
        assembler.feed(&data)?;
    }
    let trailers = answer.trailers().await.map_err(broken)?.unwrap_or_default();
    match status_of(&trailers) {
        Some(status) if status.code() == Code::Ok => {}
        Some(status) => return Err(status.into()),
        None => return Err(Error::internal("the answer carries no status")),
    }
    body.answered();
    assembler
        .finish()?
        .ok_or_else(|| Error::internal("the answer carries no message"))
}

/// gRPC's form of a timeout: at most eight digits and a unit.
fn grpc_timeout(timeout: Duration) -> String {
    let millis = timeout.as_millis().max(1);
    if millis < 100_000_000 {
        format!("{millis}m")
    } else {
        format!("{}S", timeout.as_secs().min(99_999_999))
    }
}

/// The status `headers` carry, if they carry one. Its details are left unread: tonic panics on
/// details that are not base64, and no caller here uses them.
fn status_of(headers: &HeaderMap) -> Option<Status> {
    if !headers.contains_key("grpc-status") {
        return None;
    }
    let mut headers = headers.clone();
    headers.remove("grpc-status-details-bin");
    Status::from_header_map(&headers)
}

/// The body of a request by hand, reset if the call is dropped before it was answered (cut
/// short by a timeout, a lost peer, Ctrl-C): the reset drops the frames HTTP/2 still queues,
/// slices of the caller's arrays, at once, where a dropped stream would go on sending them.
struct Outgoing(Option<h2::SendStream<Bytes>>);

impl Outgoing {
    fn stream(&mut self) -> &mut h2::SendStream<Bytes> {
        self.0
            .as_mut()
            .expect("a request's body until it is answered")
    }

    fn answered(&mut self) {
        self.0 = None;
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if let Some(stream) = self.0.as_mut() {
            stream.send_reset(h2::Reason::CANCEL);
        }
    }
}

/// A call cut short by the connection or the peer.
fn broken(error: h2::Error) -> Error {
    Error::unavailable(match error.get_io() {
        Some(io) => format!("the connection broke: {io}"),
        None => error.to_string(),
    })
}

/// The one message of a request's `body`, at most `max` bytes, gathered as it arrives. A body
/// that brings nothing for `idle` (a stalled or frozen caller) is given up.
pub async fn collect(mut body: Body, max: usize, idle: Duration) -> Result<Arrived> {
    let mut assembler = Assembler::new(max);
    while let Some(data) = stall::next_data(&mut body, idle).await? {
        assembler.feed(&data)?;
    }
    assembler
        .finish()?
        .ok_or_else(|| Error::invalid_argument("the request carries no message"))
}

/// An OK answer by hand: `frames` (one gRPC-framed message), then an OK status in the trailers.
pub fn respond(frames: Vec<Bytes>) -> http::Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = frames
        .into_iter()
        .map(http_body::Frame::data)
        .chain([http_body::Frame::trailers(trailers)]);
    let body = http_body_util::StreamBody::new(futures::stream::iter(frames.map(Ok::<_, Status>)));
    http::Response::builder()
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(Body::new(body))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_take_grpcs_form() {
        assert_eq!(grpc_timeout(Duration::from_millis(1500)), "1500m");
        assert_eq!(grpc_timeout(Duration::from_micros(10)), "1m");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), "200000S");
    }

    #[test]
    fn a_status_with_undecodable_details_is_read_without_them() {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", "5".parse().unwrap());
        headers.insert("grpc-message", "no%20such".parse().unwrap());
        headers.insert("grpc-status-details-bin", "!!not base64!!".parse().unwrap());
        let status = status_of(&headers).unwrap();
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, "no such")
        );
        assert!(status_of(&HeaderMap::new()).is_none());
    }
}
