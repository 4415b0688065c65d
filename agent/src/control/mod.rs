//! The daemon's control socket: sandboxes added, removed, listed and looked
//! up (for `exec`), its status and recent denials, and the inference.local
//! route of a sandbox, changed at runtime.
//!
//! A Unix stream socket, mode 0600 in a 0700 directory, and every peer's
//! uid checked (SO_PEERCRED) to be root. One JSON request per line, one
//! JSON reply per line, `{"ok":true,...}` or `{"ok":false,"error":"..."}`:
//!
//! ```text
//! {"op":"sandbox_add","spec":{"name":"web","cgroup":"/sys/fs/cgroup/web","policy":"/etc/web.yaml"}}
//! {"op":"sandbox_remove","name":"web","detach":false,"force":false}
//! {"op":"sandbox_list"}   {"op":"status"}
//! {"op":"sandbox_get","name":"web"}                 (for exec: the sandbox, its netns cookie, the agent CA)
//! {"op":"recent_denials","sandbox":"web","since_seconds":3600}   (both optional)
//! {"op":"get","sandbox":"web"}                      (sandbox optional when one has inference)
//! {"op":"set","provider":"openai","model":"gpt-4o-mini"}
//! {"op":"update","model":"gpt-4o"}                  (provider and model each optional)
//! {"op":"upgrade","binary":"/usr/local/bin/sandbox-egress","drain_timeout_ms":600000}   (binary optional)
//! ```
//!
//! `request` holds the requests and [`Answer`], the interface the daemon
//! implements; `spec` a sandbox's spec as requests carry it; `server` and
//! `client` the two ends of the socket. Nothing here knows the daemon.

mod client;
mod line;
mod request;
mod server;
mod spec;

pub use self::{
    client::{request, request_within},
    request::{Answer, BoxFuture, ControlRequest},
    server::{spawn, ControlServer},
    spec::{spec_file_stem, SandboxSpec},
};

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/sandbox-egress/control.sock";
pub const ROOT_UID: u32 = 0;
