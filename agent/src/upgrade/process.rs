//! Both ends of the handover: [`Successor`] in the running daemon (the
//! new process it started), [`Predecessor`] in the new one.

use std::{
    ffi::OsString,
    os::{
        fd::{AsRawFd, RawFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use super::{
    inventory::{FinalState, HandedSockets, Inventory},
    transfer::{Channel, TimedOut},
    UPGRADE_FD_ENV,
};

const READY: u8 = b'R';
const TAKEN_OVER: u8 = b'A';
/// Sockets a handover may carry: 4 per sandbox (1024 specs) and a few.
const MAX_SOCKETS: usize = 4 * 1024 + 16;
/// How long the new daemon waits for each part the old one sends.
const FINAL_STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new daemon that closed the channel is given to exit.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// The new daemon, as the running one sees it.
pub struct Successor {
    child: Child,
    channel: Channel,
}

impl Successor {
    /// Starts `binary` with `args` and its end of the channel.
    pub fn start(binary: &Path, args: &[OsString]) -> Result<Self> {
        let (channel, theirs) = Channel::pair()?;
        let inherited = theirs.as_raw_fd();
        let mut command = Command::new(binary);
        command.args(args).env(UPGRADE_FD_ENV, inherited.to_string()).stdin(Stdio::null());
        // SAFETY: fcntl is async-signal-safe; it only clears close-on-exec on our own descriptor.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(inherited, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().with_context(|| format!("cannot start {}", binary.display()))?;
        drop(theirs);
        Ok(Self { child, channel })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the sockets (`fds[i]` is `inventory.sockets[i]`) and the inventory.
    pub fn hand_over(&mut self, fds: &[RawFd], inventory: &Inventory) -> Result<()> {
        ensure!(fds.len() == inventory.sockets.len(), "one role per socket");
        let data = serde_json::to_vec(inventory)?;
        let sent = self.channel.send_fds(fds).and_then(|()| self.channel.send_data(&data));
        sent.map_err(|error| self.failure(error))
    }

    /// Waits (up to `timeout`) until the new daemon serves; its pid.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<u32> {
        self.channel.set_timeout(Some(timeout))?;
        let message = self.channel.receive_message();
        match message {
            Ok((READY, pid)) => std::str::from_utf8(&pid).ok().and_then(|pid| pid.parse().ok()).context("a bad pid"),
            Ok((tag, _)) => Err(self.failure(anyhow::anyhow!("unexpected packet {:?}", tag as char))),
            Err(error) if error.is::<TimedOut>() => Err(self.failure(anyhow::anyhow!(
                "the new daemon was not ready within {}",
                humantime::format_duration(timeout)
            ))),
            Err(error) => Err(self.failure(error)),
        }
    }

    /// Sends what the old daemon recorded so far, and waits for the new one
    /// to take over; a new daemon that does not is stopped.
    pub fn finish(&mut self, state: &FinalState, timeout: Duration) -> Result<()> {
        let data = serde_json::to_vec(state)?;
        let taken_over = self.channel.set_timeout(Some(timeout)).and_then(|()| {
            self.channel.send_data(&data)?;
            match self.channel.receive_message()? {
                (TAKEN_OVER, _) => Ok(()),
                (tag, _) => bail!("unexpected packet {:?}", tag as char),
            }
        });
        taken_over.map_err(|error| self.failure(error))
    }

    /// The reason of a handover that failed: the new daemon is stopped (it
    /// may have exited already, which then is the reason).
    fn failure(&mut self, error: anyhow::Error) -> anyhow::Error {
        match self.exit_status() {
            Some(status) => anyhow::anyhow!("the new daemon exited ({status}) before it was ready: its log says why"),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                error.context("the new daemon was stopped")
            }
        }
    }

    /// Its exit status if it exits within a moment (the channel closes as
    /// it exits, a little before it is reaped).
    fn exit_status(&mut self) -> Option<ExitStatus> {
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The daemon handing over, as the new one sees it.
pub struct Predecessor {
    channel: Channel,
    pub pid: u32,
}

/// What a new daemon was handed: the sockets, and the inventory.
pub type Handed = (Predecessor, Inventory, HandedSockets);

impl Predecessor {
    /// In a daemon started by `upgrade`, reads the handover; `None` otherwise.
    pub fn receive() -> Result<Option<Handed>> {
        let Some(fd) = std::env::var_os(UPGRADE_FD_ENV) else { return Ok(None) };
        let fd: RawFd =
            fd.to_str().and_then(|fd| fd.parse().ok()).with_context(|| format!("{UPGRADE_FD_ENV}={fd:?}"))?;
        // SAFETY: the daemon that started this one passed this descriptor for this alone.
        let channel = unsafe { Channel::from_raw(fd) };
        // Not passed on again: a later upgrade makes a channel of its own.
        // SAFETY: fcntl on a descriptor this process owns.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("close-on-exec on the handover channel");
        }
        channel.set_timeout(Some(FINAL_STATE_TIMEOUT))?;
        let (fds, data) = channel.receive_fds_and_data(MAX_SOCKETS)?;
        let inventory: Inventory = serde_json::from_slice(&data).context("the handover's inventory")?;
        ensure!(
            fds.len() == inventory.sockets.len(),
            "{} sockets handed over for {} roles",
            fds.len(),
            inventory.sockets.len()
        );
        let sockets = HandedSockets::sort(inventory.sockets.iter().cloned().zip(fds));
        Ok(Some((Self { channel, pid: inventory.from_pid }, inventory, sockets)))
    }

    /// Tells the old daemon this one serves; returns what it recorded
    /// until it stopped accepting.
    pub fn ready(&self) -> Result<FinalState> {
        self.channel.send(READY, std::process::id().to_string().as_bytes())?;
        let data = self.channel.receive_data()?;
        serde_json::from_slice(&data).context("the handover's final state")
    }

    /// The old daemon may answer `upgrade` and drain.
    pub fn taken_over(self) -> Result<()> {
        self.channel.send(TAKEN_OVER, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_that_exits_or_stays_silent_is_reported_and_gone() {
        let mut exits = Successor::start(Path::new("/bin/sh"), &["-c".into(), "exit 7".into()]).unwrap();
        let error = exits.wait_ready(Duration::from_secs(10)).unwrap_err().to_string();
        assert_eq!(error, "the new daemon exited (exit status: 7) before it was ready: its log says why");

        let mut silent = Successor::start(Path::new("/bin/sleep"), &["30".into()]).unwrap();
        let pid = silent.pid();
        let error = format!("{:#}", silent.wait_ready(Duration::from_millis(100)).unwrap_err());
        assert_eq!(error, "the new daemon was stopped: the new daemon was not ready within 100ms");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "killed and reaped");

        let missing = Successor::start(Path::new("/nonexistent/sandbox-egress"), &[]).err().unwrap();
        assert!(format!("{missing:#}").starts_with("cannot start /nonexistent/sandbox-egress: "), "{missing:#}");
    }
}
