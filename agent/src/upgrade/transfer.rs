//! The handover channel: one SOCK_SEQPACKET pair between the running
//! daemon and its successor. Each packet is a tag byte and a payload;
//! sockets travel as SCM_RIGHTS in packets of their own, data longer than
//! a packet in chunks closed by an end packet.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::sys::time::TimeVal;

/// Payload bytes per packet, well within the socket's send buffer.
const CHUNK: usize = 32 * 1024;
/// Descriptors per packet: the kernel takes at most 253 (SCM_MAX_FD).
const FDS_PER_PACKET: usize = 200;

const SOCKETS: u8 = b'F';
const DATA: u8 = b'D';
const END: u8 = b'E';

/// A read that waited longer than the channel's timeout.
#[derive(Debug)]
pub struct TimedOut;

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no answer in time on the handover channel")
    }
}

impl std::error::Error for TimedOut {}

/// One end of the handover channel.
pub struct Channel(OwnedFd);

impl Channel {
    /// A connected pair (close-on-exec; the successor's end is made
    /// inheritable where it is passed on).
    pub fn pair() -> Result<(Self, OwnedFd)> {
        let (ours, theirs) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).context("socketpair")?;
        Ok((Self(ours), theirs))
    }

    /// The end a predecessor passed on as descriptor `fd`.
    ///
    /// # Safety
    /// `fd` must be an open descriptor owned by nothing else.
    pub unsafe fn from_raw(fd: RawFd) -> Self {
        // SAFETY: the caller's promise.
        Self(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Reads give up after `timeout` (`None`: wait for ever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        let time = timeout.map_or(TimeVal::new(0, 0), |timeout| {
            TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros().max(1) as _)
        });
        setsockopt(&self.0, sockopt::ReceiveTimeout, &time).context("SO_RCVTIMEO")?;
        Ok(())
    }

    /// Sends `fds`, in as many packets as needed; the receiver learns how
    /// many from the data that follows.
    pub fn send_fds(&self, fds: &[RawFd]) -> Result<()> {
        for batch in fds.chunks(FDS_PER_PACKET) {
            let rights = [ControlMessage::ScmRights(batch)];
            sendmsg::<()>(self.0.as_raw_fd(), &[IoSlice::new(&[SOCKETS])], &rights, MsgFlags::empty(), None)
                .context("send sockets (SCM_RIGHTS)")?;
        }
        Ok(())
    }

    /// Sends `data` in chunks, then the end packet.
    pub fn send_data(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(CHUNK) {
            self.send(DATA, chunk)?;
        }
        self.send(END, &[])
    }

    /// A one-packet message `tag` (not one of the channel's own).
    pub fn send(&self, tag: u8, payload: &[u8]) -> Result<()> {
        sendmsg::<()>(self.0.as_raw_fd(), &[IoSlice::new(&[tag]), IoSlice::new(payload)], &[], MsgFlags::empty(), None)
            .context("write to the handover channel")?;
        Ok(())
    }

    /// Receives descriptors until the data, then the data: (descriptors, data).
    pub fn receive_fds_and_data(&self, max_fds: usize) -> Result<(Vec<OwnedFd>, Vec<u8>)> {
        let mut fds = Vec::new();
        let mut data = Vec::new();
        loop {
            let (tag, payload, received) = self.receive()?;
            fds.extend(received);
            if fds.len() > max_fds {
                bail!("more than {max_fds} sockets handed over");
            }
            match tag {
                SOCKETS => {}
                DATA => data.extend_from_slice(&payload),
                END => return Ok((fds, data)),
                other => bail!("unexpected packet {:?} in the handover", other as char),
            }
        }
    }

    /// Receives chunks of data until its end packet.
    pub fn receive_data(&self) -> Result<Vec<u8>> {
        let (fds, data) = self.receive_fds_and_data(0)?;
        drop(fds);
        Ok(data)
    }

    /// The next one-packet message: (tag, payload). Errors on the channel's end.
    pub fn receive_message(&self) -> Result<(u8, Vec<u8>)> {
        let (tag, payload, _) = self.receive()?;
        Ok((tag, payload))
    }

    fn receive(&self) -> Result<(u8, Vec<u8>, Vec<OwnedFd>)> {
        let mut buffer = vec![0u8; CHUNK + 1];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_PACKET]);
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let message = recvmsg::<()>(self.0.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|errno| match errno {
                nix::errno::Errno::EAGAIN => anyhow::Error::new(TimedOut),
                errno => anyhow::Error::new(errno).context("read the handover channel"),
            })?;
        let mut fds = Vec::new();
        for control in message.cmsgs().context("control messages")? {
            if let ControlMessageOwned::ScmRights(received) = control {
                // SAFETY: the kernel just installed these descriptors for this process.
                fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let length = message.bytes;
        if message.flags.contains(MsgFlags::MSG_CTRUNC) {
            bail!("sockets handed over were cut off (MSG_CTRUNC)");
        }
        if length == 0 {
            bail!("the other daemon closed the handover channel");
        }
        Ok((buffer[0], buffer[1..length].to_vec(), fds))
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn sockets_and_long_data_cross_in_order() {
        let (old, theirs) = Channel::pair().unwrap();
        let new = Channel(theirs);
        let files: Vec<std::fs::File> =
            (0..FDS_PER_PACKET + 5).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
        let raw: Vec<RawFd> = files.iter().map(|file| file.as_fd().as_raw_fd()).collect();
        let data: Vec<u8> = (0..CHUNK * 3 + 7).map(|n| n as u8).collect();
        let sender = std::thread::spawn(move || {
            old.send_fds(&raw).unwrap();
            old.send_data(&data).unwrap();
            old.send(b'R', b"42").unwrap();
            drop(files);
            old
        });
        let (fds, received) = new.receive_fds_and_data(1000).unwrap();
        assert_eq!(fds.len(), FDS_PER_PACKET + 5);
        assert_eq!(received.len(), CHUNK * 3 + 7);
        assert!(received.iter().enumerate().all(|(n, byte)| *byte == n as u8));
        assert_eq!(new.receive_message().unwrap(), (b'R', b"42".to_vec()));
        drop(sender.join().unwrap());
        let closed = new.receive_message().unwrap_err().to_string();
        assert!(closed.contains("closed the handover channel"), "{closed}");
        assert!(new.receive_fds_and_data(1).is_err());
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (ours, _theirs) = Channel::pair().unwrap();
        ours.set_timeout(Some(Duration::from_millis(20))).unwrap();
        assert!(ours.receive_message().unwrap_err().is::<TimedOut>());
    }
}
