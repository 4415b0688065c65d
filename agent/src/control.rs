//! The daemon's control socket: sandboxes added, removed and listed, its
//! status, and the inference.local route of a sandbox, changed at runtime.
//!
//! A Unix stream socket, mode 0600 in a 0700 directory, and every peer's
//! uid checked (SO_PEERCRED) to be root. One JSON request per line, one
//! JSON reply per line, `{"ok":true,...}` or `{"ok":false,"error":"..."}`:
//!
//! ```text
//! {"op":"sandbox_add","spec":{"name":"web","cgroup":"/sys/fs/cgroup/web","policy":"/etc/web.yaml"}}
//! {"op":"sandbox_remove","name":"web","detach":false,"force":false}
//! {"op":"sandbox_list"}   {"op":"status"}
//! {"op":"get","sandbox":"web"}                      (sandbox optional when one has inference)
//! {"op":"set","provider":"openai","model":"gpt-4o-mini"}
//! {"op":"update","model":"gpt-4o"}                  (provider and model each optional)
//! ```

use std::{
    fs::{self, DirBuilder, Permissions},
    io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
    time::timeout,
};

use crate::daemon::SandboxSpec;

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/sandbox-egress/control.sock";
pub const ROOT_UID: u32 = 0;
/// Requests are a few dozen bytes.
const MAX_REQUEST_LINE: usize = 4096;
/// Replies list every sandbox: up to 1024 spec files of a few hundred bytes each.
const MAX_REPLY_LINE: usize = 4 * 1024 * 1024;
const MAX_CONTROL_CLIENTS: usize = 8;
/// A control client that says nothing for this long is dropped.
const CONTROL_IDLE: Duration = Duration::from_secs(30);
/// How long the CLI waits for the agent.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    Get {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sandbox: Option<String>,
    },
    Set {
        provider: String,
        model: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sandbox: Option<String>,
    },
    Update {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        provider: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sandbox: Option<String>,
    },
    SandboxAdd {
        spec: SandboxSpec,
    },
    SandboxRemove {
        name: String,
        #[serde(default)]
        detach: bool,
        #[serde(default)]
        force: bool,
    },
    SandboxList,
    Status,
}

/// Answers one request: the reply's fields besides `ok`, or the error.
pub type Handler = Arc<dyn Fn(ControlRequest) -> BoxFuture<Result<Value>> + Send + Sync>;
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Binds the control socket now (so a start fails at once when it cannot)
/// and serves it in the background to peers with uid `allowed_uid` (root,
/// but in tests). A stale socket file there is replaced; a live one
/// (another agent's) or anything else is an error.
pub async fn spawn(path: &Path, allowed_uid: u32, handler: Handler) -> Result<()> {
    let listener = bind_private(path).await?;
    tracing::info!(socket = %path.display(), "control socket listening");
    let path = path.to_owned();
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_CONTROL_CLIENTS));
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(socket = %path.display(), "control socket accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!("control socket busy: connection dropped");
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                control_client(stream, allowed_uid, handler).await;
                drop(slot);
            });
        }
    });
    Ok(())
}

async fn control_client(stream: UnixStream, allowed_uid: u32, handler: Handler) {
    let peer = stream.peer_cred();
    let (read, mut write) = stream.into_split();
    let authorized = match &peer {
        Ok(credentials) => authorize_peer(credentials.uid(), allowed_uid),
        Err(error) => Err(format!("peer credentials unavailable: {error}")),
    };
    if let Err(reason) = authorized {
        tracing::warn!(pid = ?peer.ok().and_then(|credentials| credentials.pid()), "control socket: {reason}");
        let _ = write.write_all(reply_line(&json!({"ok": false, "error": reason})).as_bytes()).await;
        return;
    }
    let mut reader = BufReader::new(read);
    loop {
        let line = match timeout(CONTROL_IDLE, read_line(&mut reader, MAX_REQUEST_LINE)).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(error)) => {
                let _ = write.write_all(reply_line(&json!({"ok": false, "error": error.to_string()})).as_bytes()).await;
                return;
            }
        };
        let reply = match serde_json::from_slice::<ControlRequest>(&line) {
            Err(error) => json!({"ok": false, "error": format!("invalid request: {error}")}),
            Ok(request) => match handler(request).await {
                Ok(Value::Object(mut fields)) => {
                    fields.insert("ok".into(), true.into());
                    Value::Object(fields)
                }
                Ok(other) => json!({"ok": true, "result": other}),
                Err(error) => json!({"ok": false, "error": format!("{error:#}")}),
            },
        };
        if write.write_all(reply_line(&reply).as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Only root may act on the daemon.
fn authorize_peer(peer_uid: u32, allowed_uid: u32) -> Result<(), String> {
    if peer_uid == allowed_uid {
        Ok(())
    } else {
        Err(format!("permission denied: uid {peer_uid} may not use the control socket (uid {allowed_uid} only)"))
    }
}

/// Binds `path` so that it is never reachable with looser permissions than
/// 0600: bound under a temporary name, restricted, then renamed into place.
async fn bind_private(path: &Path) -> Result<UnixListener> {
    let shown = path.display();
    let directory = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().with_context(|| format!("control socket path {shown} names no file"))?;
    if !directory.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(directory)
            .with_context(|| format!("cannot create {}", directory.display()))?;
    }
    if UnixStream::connect(path).await.is_ok() {
        bail!("{shown}: another agent is serving this control socket (stop it, or give --control-socket another path)");
    }
    remove_stale_socket(path)?;
    let temporary = directory.join(format!(".{}.{}", file_name.to_string_lossy(), std::process::id()));
    remove_stale_socket(&temporary)?;
    let listener = UnixListener::bind(&temporary).with_context(|| format!("cannot bind {}", temporary.display()))?;
    let placed =
        fs::set_permissions(&temporary, Permissions::from_mode(0o600)).and_then(|()| fs::rename(&temporary, path));
    if let Err(error) = placed {
        let _ = fs::remove_file(&temporary);
        return Err(error).with_context(|| format!("cannot create the control socket {shown}"));
    }
    Ok(listener)
}

/// Removes a socket left by an earlier run; refuses to remove anything else.
fn remove_stale_socket(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {}", path.display()))
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("cannot inspect {}", path.display())),
    }
}

/// One line without its end, at most `max` bytes; `None` at EOF.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    (&mut *reader).take(max as u64 + 1).read_until(b'\n', &mut line).await?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("line longer than {max} bytes")));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

fn reply_line(reply: &Value) -> String {
    format!("{reply}\n")
}

/// Sends one request to the agent's control socket; the reply when it says
/// `"ok": true`, its error otherwise.
pub async fn request(path: &Path, request: &ControlRequest) -> Result<Value> {
    let shown = path.display();
    let exchange = async {
        let stream = UnixStream::connect(path).await.with_context(|| {
            format!("cannot connect to the agent's control socket {shown} (is the agent running, and are you root?)")
        })?;
        let (read, mut write) = stream.into_split();
        let sent = write.write_all(format!("{}\n", serde_json::to_string(request)?).as_bytes()).await;
        // A refused peer gets its reply at once and the connection closed,
        // possibly before the request was written: the reply still counts.
        match (read_line(&mut BufReader::new(read), MAX_REPLY_LINE).await?, sent) {
            (Some(line), _) => Ok(line),
            (None, Err(error)) => Err(error).context("sending the request failed"),
            (None, Ok(())) => bail!("the agent closed the control connection without a reply"),
        }
    };
    let line = timeout(CLIENT_TIMEOUT, exchange)
        .await
        .with_context(|| format!("no reply on {shown} within {CLIENT_TIMEOUT:?}"))??;
    let reply: Value = serde_json::from_slice(&line).context("the agent's reply is not JSON")?;
    if reply["ok"] == Value::Bool(true) {
        Ok(reply)
    } else {
        bail!("{}", reply["error"].as_str().unwrap_or("the agent refused the request"))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// A directory of its own under the system's temporary directory.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("sandbox-egress-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn only_the_allowed_uid_passes() {
        assert_eq!(authorize_peer(0, ROOT_UID), Ok(()));
        let refused = authorize_peer(1000, ROOT_UID).unwrap_err();
        assert!(refused.contains("permission denied") && refused.contains("uid 1000"), "{refused}");
    }

    #[test]
    fn requests_parse_strictly() {
        let parse = |text: &str| serde_json::from_str::<ControlRequest>(text);
        assert_eq!(parse(r#"{"op":"get"}"#).unwrap(), ControlRequest::Get { sandbox: None });
        assert_eq!(
            parse(r#"{"op":"update","model":"m","sandbox":"web"}"#).unwrap(),
            ControlRequest::Update { provider: None, model: Some("m".into()), sandbox: Some("web".into()) }
        );
        assert_eq!(
            parse(r#"{"op":"sandbox_remove","name":"web"}"#).unwrap(),
            ControlRequest::SandboxRemove { name: "web".into(), detach: false, force: false }
        );
        assert!(parse(r#"{"op":"set","provider":"p"}"#).unwrap_err().to_string().contains("model"));
        assert!(parse(r#"{"op":"set","provider":"p","model":"m","extra":1}"#)
            .unwrap_err()
            .to_string()
            .contains("extra"));
        assert!(parse(r#"{"op":"delete"}"#).is_err());
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let mut reader = BufReader::new(&b"short\r\nnext"[..]);
        assert_eq!(read_line(&mut reader, 16).await.unwrap(), Some(b"short".to_vec()));
        assert_eq!(read_line(&mut reader, 16).await.unwrap(), Some(b"next".to_vec()));
        assert_eq!(read_line(&mut reader, 16).await.unwrap(), None);
        let long = [b'x'; 100];
        let error = read_line(&mut BufReader::new(&long[..]), 16).await.unwrap_err();
        assert!(error.to_string().contains("longer than 16 bytes"), "{error}");
    }

    #[tokio::test]
    async fn socket_is_private_and_replaces_only_sockets() {
        let temp = TempDir::new("control-bind");
        let path = temp.path().join("run/sub/control.sock");
        let listener = bind_private(&path).await.unwrap();
        let mode = |path: &Path| fs::metadata(path).unwrap().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        // A live socket is another agent's: never taken over...
        let error = bind_private(&path).await.unwrap_err().to_string();
        assert!(error.contains("another agent is serving this control socket"), "{error}");
        // ...a stale one is replaced.
        drop(listener);
        let _again = bind_private(&path).await.unwrap();
        // ...but never a regular file.
        let file = temp.path().join("file");
        fs::write(&file, "keep").unwrap();
        assert!(bind_private(&file).await.unwrap_err().to_string().contains("is not a socket"));
        assert_eq!(fs::read_to_string(&file).unwrap(), "keep");
    }
}
