//! The end of a drain: when the daemon's drain timeout runs out (after an
//! upgrade handed over, or on SIGTERM), every connection still in flight
//! is reset, and its close line says so. One daemon per process, so one
//! signal per process.

use std::{
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    sync::LazyLock,
};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::sync::watch;

static CUT: LazyLock<watch::Sender<bool>> = LazyLock::new(|| watch::channel(false).0);

/// Cuts every connection in flight, now and from now on.
pub fn cut_all() {
    CUT.send_replace(true);
}

/// Resolves when connections are to be cut.
pub async fn cut() {
    let mut cut = CUT.subscribe();
    let _ = cut.wait_for(|cut| *cut).await;
}

/// A client socket, known by its kernel cookie, to reset once its
/// connection is cut.
pub struct Resettable {
    fd: RawFd,
    cookie: Option<u64>,
}

impl Resettable {
    pub fn of(socket: &impl AsRawFd) -> Self {
        let fd = socket.as_raw_fd();
        Self { fd, cookie: cookie(fd) }
    }

    /// Sets SO_LINGER 0 (the close that follows sends a reset) if the
    /// descriptor is still that socket: the connection's walk may have
    /// closed it already, and the number may name another socket by now.
    pub fn reset_on_close(&self) {
        if self.cookie.is_none() || cookie(self.fd) != self.cookie {
            return;
        }
        // SAFETY: the descriptor is open and still this socket (checked just above).
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let _ = setsockopt(&fd, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 });
    }
}

/// The kernel's cookie of the socket `fd` names (SO_COOKIE), unique for
/// the life of the system; `None` if `fd` names no socket.
fn cookie(fd: RawFd) -> Option<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`; a closed fd is an error.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut cookie).cast(), &mut len) };
    (rc == 0).then_some(cookie)
}
