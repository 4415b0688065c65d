//! The one line each decided request, call, operation or message logs.

use std::net::SocketAddr;

use super::{grpc::GrpcCall, target::Target, Call};
use crate::{
    conn::Origin,
    policy::{Message, RequestDecision},
};

/// A gRPC call's part of its line: the call, and its final `grpc-status`
/// once known (the origin's, or the agent's own on a refusal).
#[derive(Clone, Copy)]
pub struct GrpcLine<'a> {
    pub call: &'a GrpcCall,
    pub status: Option<u32>,
}

/// The line of an allowed request, logged once its credential is applied
/// (HTTP/1), or when its stream ends (HTTP/2, with the final `grpc-status`).
pub struct Line {
    pub method: String,
    pub path: String,
    pub call: Call,
    pub generation: u64,
    pub decision: RequestDecision,
    /// The provider whose credential it carries.
    pub credential: Option<String>,
}

impl Line {
    pub fn emit(&self, origin: &Origin, target: &Target, status: Option<u16>, grpc: Option<GrpcLine>) {
        let Line { method, path, call, generation, decision, credential } = self;
        log_request(origin, target, method, path, call, *generation, decision, credential.as_deref(), status, grpc);
    }
}

/// One line per decided call of a request on an inspected connection:
/// the request, what the room read of it (never arguments, never a
/// secret), the verdict; `credential`: the provider whose credential it
/// carried (or whose placeholder was refused); `status`: the agent's
/// refusal's (an allowed request's comes from the origin, later; a
/// WebSocket message has none); `grpc`: the call of a gRPC request.
#[allow(clippy::too_many_arguments)]
pub fn log_request(
    origin: &Origin,
    target: &Target,
    method: &str,
    path: &str,
    call: &Call,
    generation: u64,
    decision: &RequestDecision,
    credential: Option<&str>,
    status: Option<u16>,
    grpc: Option<GrpcLine>,
) {
    let verdict = match (decision.allow, decision.audit) {
        (true, false) => "allowed",
        (true, true) => "audit",
        (false, _) => "denied",
    };
    let (rpc_method, tool, operation) = match &call.message {
        Message::JsonRpcCall { method, tool } => (Some(method.as_str()), tool.as_deref(), None),
        Message::GraphQl(operation) => (None, None, Some(operation)),
        _ => (None, None, None),
    };
    let destination: SocketAddr = target.upstream;
    tracing::info!(
        event = "request",
        verdict,
        method,
        path,
        host = target.name,
        destination = %destination,
        message = message_kind(&call.message, method),
        rpc_method,
        tool,
        operation_type = operation.map(|operation| operation.operation_type.as_str()),
        operation_name = operation.map(|operation| operation.operation_name.as_str()),
        fields = operation.map(|operation| operation.fields.join(",")),
        policy = decision.policy,
        rule = decision.rule,
        policy_generation = generation,
        reason = decision.reason,
        credential,
        status,
        grpc_service = grpc.map(|grpc| grpc.call.service.as_str()),
        grpc_method = grpc.map(|grpc| grpc.call.method.as_str()),
        grpc_status = grpc.and_then(|grpc| grpc.status),
        pid = origin.pid,
        exe = origin.exe.as_ref().map(|exe| exe.display().to_string()),
        comm = origin.comm,
        uid = origin.uid,
        cgroup_id = origin.cgroup_id,
        client = %origin.client,
    );
}

/// The kind of message a log line decided, for protocols with messages
/// (`text`: a WebSocket client text message).
fn message_kind(message: &Message, method: &str) -> Option<&'static str> {
    match message {
        Message::Http if method == super::WEBSOCKET_TEXT => Some("text"),
        Message::Http => None,
        Message::JsonRpcCall { .. } => Some("call"),
        Message::JsonRpcResponse => Some("response"),
        Message::ReceiveStream => Some("receive_stream"),
        Message::SessionEnd => Some("session_end"),
        Message::GraphQl(_) => Some("operation"),
        Message::GraphQlUnregistered => Some("persisted_query"),
    }
}

/// A call as a refusal names it: the JSON-RPC method and tool, the GraphQL
/// operation (names from the sandbox, escaped).
pub fn describe_call(message: &Message) -> Option<String> {
    match message {
        Message::JsonRpcCall { method, tool: Some(tool) } => {
            Some(format!("{} {}", method.escape_debug(), tool.escape_debug()))
        }
        Message::JsonRpcCall { method, tool: None } => Some(method.escape_debug().to_string()),
        Message::GraphQl(operation) => Some(format!(
            "{} {}{}",
            operation.operation_type,
            if operation.operation_name.is_empty() {
                "(anonymous)".into()
            } else {
                operation.operation_name.escape_debug().to_string()
            },
            if operation.fields.is_empty() {
                String::new()
            } else {
                format!(" {{{}}}", operation.fields.join(", ").escape_debug())
            }
        )),
        _ => None,
    }
}
