//! The daemon's end: a root-only socket, one task per client, each request
//! handed to the [`Answer`] the daemon gave.

use std::{
    fs::{self, DirBuilder, Permissions},
    io,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    },
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{watch, Semaphore},
    time::timeout,
};

use super::{
    line::{read_line, reply_line},
    Answer, ControlRequest,
};

/// Requests are a few dozen bytes.
const MAX_REQUEST_LINE: usize = 4096;
const MAX_CONTROL_CLIENTS: usize = 8;
/// A control client that says nothing for this long is dropped.
const CONTROL_IDLE: Duration = Duration::from_secs(30);

/// The control socket served in the background.
pub struct ControlServer {
    /// A duplicate of the listening socket, for an upgrade to hand over.
    socket: OwnedFd,
    stop: watch::Sender<bool>,
    clients: Arc<Semaphore>,
}

impl ControlServer {
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Stops accepting (the socket stays open wherever else it is, so
    /// clients wait for the daemon that took it over), then waits up to
    /// `within` for the clients being answered (the `upgrade` that asked
    /// for this reads its reply).
    pub async fn stop(self, within: Duration) {
        let _ = self.stop.send(true);
        let _ = timeout(within, self.clients.acquire_many(MAX_CONTROL_CLIENTS as u32)).await;
    }
}

/// Binds the control socket now (so a start fails at once when it cannot),
/// or takes the one an upgrade handed over (`inherited`), and serves it in
/// the background to peers with uid `allowed_uid` (root, but in tests). A
/// stale socket file there is replaced; a live one (another agent's) or
/// anything else is an error.
pub async fn spawn<A: Answer>(
    path: &Path,
    allowed_uid: u32,
    answer: Arc<A>,
    inherited: Option<OwnedFd>,
) -> Result<ControlServer> {
    let listener = match inherited {
        Some(fd) => {
            let listener = std::os::unix::net::UnixListener::from(fd);
            listener.set_nonblocking(true)?;
            UnixListener::from_std(listener)?
        }
        None => bind_private(path).await?,
    };
    let socket = listener.as_fd().try_clone_to_owned().context("duplicate the control socket")?;
    tracing::info!(socket = %path.display(), "control socket listening");
    let path = path.to_owned();
    let slots = Arc::new(Semaphore::new(MAX_CONTROL_CLIENTS));
    let clients = slots.clone();
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                // A handle dropped without `stop` leaves it serving.
                Ok(_) = stopped.wait_for(|stop| *stop) => return,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
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
            let answer = answer.clone();
            tokio::spawn(async move {
                control_client(stream, allowed_uid, answer).await;
                drop(slot);
            });
        }
    });
    Ok(ControlServer { socket, stop, clients })
}

async fn control_client<A: Answer>(stream: UnixStream, allowed_uid: u32, answer: Arc<A>) {
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
            Ok(request) => match answer.clone().answer(request).await {
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::control::ROOT_UID;

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
