//! The few bpf(2) calls aya 0.14 cannot make for us: links for program
//! types it does not expose (setsockopt links cannot be taken as `FdLink`s,
//! unix socket address hooks are unknown to it), and loading a program the
//! agent assembles itself.

use std::{
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use anyhow::{Context, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `union bpf_attr` is larger; the kernel wants the rest zeroed.
const ATTR_SIZE: usize = 128;

pub const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
pub const BPF_CGROUP_SETSOCKOPT: u32 = 22;
pub const BPF_CGROUP_UNIX_CONNECT: u32 = 49;
pub const BPF_CGROUP_UNIX_SENDMSG: u32 = 50;

fn bpf(command: libc::c_long, attr: &[u8; ATTR_SIZE]) -> std::io::Result<i64> {
    // SAFETY: bpf(2) reads a bpf_attr of ATTR_SIZE bytes, whose pointers
    // (set by the callers) outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_ptr(), ATTR_SIZE) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

fn put_u32(attr: &mut [u8; ATTR_SIZE], offset: usize, value: u32) {
    attr[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; ATTR_SIZE], offset: usize, value: u64) {
    attr[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// BPF_LINK_CREATE of `program` on the cgroup `cgroup_dir` at `attach_type`.
pub fn link_create(program: BorrowedFd<'_>, cgroup_dir: BorrowedFd<'_>, attach_type: u32) -> Result<OwnedFd> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, program.as_raw_fd() as u32);
    put_u32(&mut attr, 4, cgroup_dir.as_raw_fd() as u32);
    put_u32(&mut attr, 8, attach_type);
    bpf(BPF_LINK_CREATE, &attr).map(owned).with_context(|| format!("bpf(BPF_LINK_CREATE) at attach type {attach_type}"))
}

/// BPF_OBJ_PIN of a link or program at `path` (on bpffs).
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let path_c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; ATTR_SIZE];
    put_u64(&mut attr, 0, path_c.as_ptr() as u64);
    put_u32(&mut attr, 8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &attr).map(drop).with_context(|| format!("pin {}", path.display()))
}

/// BPF_PROG_LOAD of `instructions` (GPL-compatible); the verifier's log is
/// in the error when the kernel refuses it.
pub fn prog_load(program_type: u32, expected_attach_type: u32, name: &str, instructions: &[u64]) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, program_type);
    put_u32(&mut attr, 4, instructions.len() as u32);
    put_u64(&mut attr, 8, instructions.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 24, 1); // log_level
    put_u32(&mut attr, 28, log.len() as u32);
    put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
    let name = name.as_bytes();
    let name_len = name.len().min(15);
    attr[48..48 + name_len].copy_from_slice(&name[..name_len]);
    put_u32(&mut attr, 68, expected_attach_type);
    bpf(BPF_PROG_LOAD, &attr).map(owned).with_context(|| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        format!(
            "bpf(BPF_PROG_LOAD) of {}: verifier log: {}",
            String::from_utf8_lossy(name),
            String::from_utf8_lossy(&log[..end])
        )
    })
}
