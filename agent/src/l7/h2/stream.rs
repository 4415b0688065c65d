//! One HTTP/2 stream of an inspected connection: one request, decided by
//! the request decision HTTP/1 uses ([`decide_request`]), its credential
//! applied, then relayed on its own stream to the origin in both
//! directions as data arrives; a refusal in HTTP terms, or gRPC's for a
//! gRPC call. Whatever happens to it, the connection's other streams go on.

use std::{future::poll_fn, time::Duration};

use bytes::Bytes;
use h2::{
    client::{ResponseFuture, SendRequest},
    server::SendResponse,
    RecvStream,
};
use http::{header::CONTENT_TYPE, HeaderMap, HeaderValue, Request};
use tokio::time::timeout;

use super::{
    super::{
        body::{self, ReadError},
        check::{decide_request, Allowed, Decided, RequestBody},
        grpc::{self, GrpcCall},
        log::{GrpcLine, Line},
        session::names_target,
        target::{Target, Unserved},
    },
    head::{forward_request, request_head},
    pipe::{pipe, send_all, Piped},
};
use crate::{
    conn::{
        refuse::{ErrorBody, Response},
        CloseLog, Context, Origin,
    },
    credentials::CredentialedHead,
    http1::RequestHead,
};

/// Longest wait for the origin's response head, as on HTTP/1.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);

/// What every stream of one connection shares.
pub struct Streams<'a> {
    pub target: &'a Target,
    pub origin: &'a Origin,
    pub context: &'a Context,
    pub upstream: Result<SendRequest<Bytes>, Unserved>,
}

/// How an allowed stream ended, for its line.
#[derive(Default)]
struct Ended {
    /// The response's status: the origin's, or the agent's own.
    status: Option<u16>,
    /// The final `grpc-status`, from the trailers (or a trailers-only
    /// response's head).
    grpc_status: Option<u32>,
    error: Option<String>,
}

impl Streams<'_> {
    /// Serves one stream; returns its part of the connection's close log.
    pub async fn serve(&self, request: Request<RecvStream>, mut respond: SendResponse<Bytes>) -> CloseLog {
        let mut log = CloseLog::default();
        let (parts, mut recv) = request.into_parts();
        let is_grpc = is_grpc_request(&parts.headers);
        let mut head = match request_head(&parts) {
            Ok(head) => head,
            Err(reason) => {
                log.verdict = "denied";
                log.denial = Some("bad_request");
                log.reason = Some(reason.clone());
                answer(&mut respond, &error_response(is_grpc, 400, "bad_request", "malformed HTTP/2 request", &reason));
                return log;
            }
        };
        if let Err(reason) = names_target(&head, self.target) {
            log.verdict = "denied";
            log.reason = Some(reason.clone());
            answer(&mut respond, &error_response(is_grpc, 403, "host_mismatch", &head.target, &reason));
            return log;
        }
        let mut source = StreamBody { recv: &mut recv };
        let decided = decide_request(&mut source, &mut head, self.target, self.origin, self.context, &mut log).await;
        let allowed = match decided {
            Decided::Allowed(allowed) => allowed,
            Decided::Refused(refused) => {
                let response = match is_grpc {
                    true => grpc::trailers_only(grpc::status_for(refused.status), &refused.message),
                    false => refused.response,
                };
                answer(&mut respond, &response);
                return log;
            }
        };
        let Allowed { credential, body, line, .. } = *allowed;
        let call = line.as_ref().and_then(|line| grpc::call(&head, &line.path));
        let forwarded = credential.as_ref().map_or(&head, CredentialedHead::head);
        let authority = head.authority.as_ref().map(ToString::to_string).unwrap_or_else(|| self.target.name.clone());
        let request = forward_request(forwarded, &authority, credential.is_some());
        // The secret's own copy is wiped now; the request's goes with the stream.
        drop(credential);
        let ended = match (request, &self.upstream) {
            (Err(reason), _) => {
                log.verdict = "denied";
                refused_here(&mut respond, is_grpc, 400, "bad_request", &head, &reason)
            }
            (Ok(_), Err(unserved)) => {
                log.upstream_failed(unserved.reason.clone());
                refused_here(&mut respond, is_grpc, unserved.status, unserved.kind, &head, &unserved.reason)
            }
            (Ok(request), Ok(upstream)) => {
                log.verdict = "relayed";
                let body = body.map(|body| Bytes::copy_from_slice(&body));
                let exchange = Exchange { respond, recv, is_grpc, log: &mut log };
                exchange.run(upstream.clone(), request, body, &head, self.context).await
            }
        };
        if let Some(error) = &ended.error {
            log.error = Some(error.clone());
        }
        if let Some(line) = line {
            log_line(&line, call.as_ref(), &ended, self);
        }
        log
    }
}

fn log_line(line: &Line, call: Option<&GrpcCall>, ended: &Ended, streams: &Streams) {
    let grpc = call.map(|call| GrpcLine { call, status: ended.grpc_status });
    line.emit(streams.origin, streams.target, ended.status, grpc);
}

/// The answer to an allowed request the agent cannot forward.
fn refused_here(
    respond: &mut SendResponse<Bytes>,
    is_grpc: bool,
    status: u16,
    kind: &str,
    head: &RequestHead,
    reason: &str,
) -> Ended {
    let what = format!("{} {}", head.method, head.target);
    answer(respond, &error_response(is_grpc, status, kind, &what, reason));
    Ended {
        status: Some(if is_grpc { 200 } else { status }),
        grpc_status: is_grpc.then(|| grpc::status_for(status)),
        error: Some(reason.to_owned()),
    }
}

/// An allowed stream between the client and the origin.
struct Exchange<'a> {
    respond: SendResponse<Bytes>,
    recv: RecvStream,
    is_grpc: bool,
    log: &'a mut CloseLog,
}

impl Exchange<'_> {
    /// Sends `request` (with `body` when the decision read it) and relays
    /// both directions until the response ends or either side resets.
    async fn run(
        mut self,
        mut upstream: SendRequest<Bytes>,
        request: Request<()>,
        body: Option<Bytes>,
        head: &RequestHead,
        context: &Context,
    ) -> Ended {
        let unreachable = |respond: &mut SendResponse<Bytes>, reason: String| {
            refused_here(respond, self.is_grpc, 502, "upstream_failed", head, &reason)
        };
        if let Err(error) = poll_fn(|cx| upstream.poll_ready(cx)).await {
            return unreachable(&mut self.respond, format!("the origin's HTTP/2 connection failed: {error}"));
        }
        let end = match &body {
            Some(body) => body.is_empty(),
            None => self.recv.is_end_stream(),
        };
        let (response, mut to_origin) = match upstream.send_request(request, end) {
            Ok(sent) => sent,
            Err(error) => return unreachable(&mut self.respond, format!("the origin refused the stream: {error}")),
        };
        let (mut bytes_up, mut bytes_down) = (0, 0);
        let ended = {
            let request_side = async {
                match body {
                    Some(body) if !end => match send_all(&mut to_origin, body).await {
                        Ok(()) => to_origin.send_data(Bytes::new(), true).map_err(|error| error.to_string()),
                        Err(error) => Err(error.to_string()),
                    },
                    Some(_) => Ok(()),
                    None if end => Ok(()),
                    None => match pipe(&mut self.recv, &mut to_origin, &mut bytes_up).await {
                        Piped::Ended(_) => Ok(()),
                        Piped::Failed(error) => Err(error.to_string()),
                    },
                }
            };
            let idle = RESPONSE_TIMEOUT.min(context.config.idle_timeout);
            let response_side = respond(&mut self.respond, response, idle, self.is_grpc, head, &mut bytes_down);
            tokio::pin!(request_side, response_side);
            // The response decides when the stream is over: an origin may answer
            // (and reset the rest of the request) before the request ends.
            let mut request_done = false;
            loop {
                tokio::select! {
                    sent = &mut request_side, if !request_done => {
                        request_done = true;
                        if let Err(error) = sent {
                            self.log.error = Some(format!("request body: {error}"));
                        }
                    }
                    ended = &mut response_side => break ended,
                }
            }
        };
        self.log.bytes_up += bytes_up;
        self.log.bytes_down += bytes_down;
        ended
    }
}

/// Waits for the origin's response and relays it to the client; a client
/// reset meanwhile ends it (dropping the origin's stream resets it).
async fn respond(
    respond: &mut SendResponse<Bytes>,
    response: ResponseFuture,
    idle: Duration,
    is_grpc: bool,
    head: &RequestHead,
    count: &mut u64,
) -> Ended {
    let response = tokio::select! {
        response = timeout(idle, response) => response,
        reset = poll_fn(|cx| respond.poll_reset(cx)) => {
            let reason = reset.map_or_else(|error| error.to_string(), |reason| format!("reset by the client: {reason}"));
            return Ended { error: Some(reason), ..Ended::default() };
        }
    };
    let response = match response {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            let reason = format!("the origin's stream failed before a response: {error}");
            return refused_here(respond, is_grpc, 502, "upstream_failed", head, &reason);
        }
        Err(_elapsed) => {
            let reason = format!("no response from the origin within {} s", idle.as_secs());
            return refused_here(respond, is_grpc, 504, "upstream_timeout", head, &reason);
        }
    };
    let (parts, mut from_origin) = response.into_parts();
    let mut ended =
        Ended { status: Some(parts.status.as_u16()), grpc_status: grpc_status(&parts.headers), error: None };
    let end = from_origin.is_end_stream();
    let mut to_client = match respond.send_response(http::Response::from_parts(parts, ()), end) {
        Ok(to_client) => to_client,
        Err(error) => return Ended { error: Some(error.to_string()), ..ended },
    };
    if end {
        return ended;
    }
    match pipe(&mut from_origin, &mut to_client, count).await {
        Piped::Ended(trailers) => {
            if let Some(status) = trailers.as_ref().and_then(grpc_status) {
                ended.grpc_status = Some(status);
            }
        }
        Piped::Failed(error) => ended.error = Some(error.to_string()),
    }
    ended
}

/// Whether a stream's request is a gRPC call, by its `content-type`.
pub fn is_grpc_request(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|value| grpc::is_grpc_content_type(value.as_bytes()))
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The agent's JSON error, or for a gRPC call its trailers-only form.
pub fn error_response(is_grpc: bool, status: u16, kind: &str, what: &str, reason: &str) -> Response {
    if is_grpc {
        let message = format!("sandbox-egress: {kind}: {}: {reason}", what.escape_debug());
        return grpc::trailers_only(grpc::status_for(status), &message);
    }
    ErrorBody::new(kind, what, reason).response(status)
}

/// Sends the agent's own `response` and ends the stream.
pub fn answer(respond: &mut SendResponse<Bytes>, response: &Response) {
    let mut head = http::Response::new(());
    *head.status_mut() = http::StatusCode::from_u16(response.status).unwrap_or(http::StatusCode::FORBIDDEN);
    for (name, value) in &response.headers {
        if let (Ok(name), Ok(value)) = (name.parse::<http::HeaderName>(), HeaderValue::from_str(value)) {
            head.headers_mut().append(name, value);
        }
    }
    let end = response.body.is_empty();
    if !end {
        head.headers_mut().insert(http::header::CONTENT_LENGTH, response.body.len().into());
    }
    // The client may be gone already: nothing more to tell it.
    if let Ok(mut stream) = respond.send_response(head, end) {
        if !end {
            let _ = stream.send_data(Bytes::copy_from_slice(&response.body), true);
        }
    }
}

/// A stream's DATA, read whole for a decision that reads the body.
struct StreamBody<'a> {
    recv: &'a mut RecvStream,
}

impl RequestBody for StreamBody<'_> {
    fn has_body(&self, _head: &RequestHead) -> bool {
        !self.recv.is_end_stream()
    }

    async fn read_whole(&mut self, head: &mut RequestHead, limit: usize, idle: Duration) -> Result<Vec<u8>, ReadError> {
        let unreadable = |reason: String| ReadError::Unreadable(reason);
        let mut read = Vec::new();
        loop {
            let data = match timeout(idle, self.recv.data()).await {
                Err(_elapsed) => return Err(unreadable(format!("no byte for {idle:?}"))),
                Ok(None) => break,
                Ok(Some(Err(error))) => return Err(unreadable(error.to_string())),
                Ok(Some(Ok(data))) => data,
            };
            if read.len() + data.len() > limit {
                return Err(ReadError::TooLarge(limit));
            }
            read.extend_from_slice(&data);
            self.recv.flow_control().release_capacity(data.len()).map_err(|error| unreadable(error.to_string()))?;
        }
        match timeout(idle, self.recv.trailers()).await {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(_))) => return Err(unreadable("trailers are not supported on a body read whole".into())),
            Ok(Err(error)) => return Err(unreadable(error.to_string())),
            Err(_elapsed) => return Err(unreadable(format!("no trailers or end for {idle:?}"))),
        }
        body::reframe(head, read.len());
        Ok(read)
    }
}
