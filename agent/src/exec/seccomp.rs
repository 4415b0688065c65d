//! The socket families a sandboxed program may create: unix, inet, inet6
//! and netlink. The cgroup hooks see inet and unix sockets only, so any other
//! family (vsock to the hypervisor host, packet, bluetooth, ...) would leave
//! the sandbox unseen; `socket(2)` and `socketpair(2)` of those fail with
//! `EPERM`, the errno the cgroup hooks give for the inet sockets they refuse
//! (raw, ICMP, SCTP, MPTCP), so one errno means "refused by the sandbox".
//! Every other system call is allowed: this closes what the hooks cannot
//! reach, it is not a general-purpose profile.
//!
//! The family is compared as the kernel reads it, the low 32 bits of the
//! first argument. 32-bit (i386) system calls are killed by the filter's
//! architecture check: their `socketcall(2)` passes the family in memory,
//! which seccomp cannot read. x32 system calls (where the kernel has them)
//! are filtered like the native ones.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

const ALLOWED_FAMILIES: [libc::c_int; 4] = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK];
const REFUSAL_ERRNO: libc::c_int = libc::EPERM;
/// x32 system call numbers are the native ones with this bit (x86_64 only).
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// The compiled filter: `socket` and `socketpair` refused with
/// [`REFUSAL_ERRNO`] unless their family is one of [`ALLOWED_FAMILIES`].
pub fn socket_family_filter() -> Result<BpfProgram> {
    // One rule, its conditions all true: the family is none of the allowed.
    let refused_family = SeccompRule::new(
        ALLOWED_FAMILIES
            .iter()
            .map(|family| SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, *family as u64))
            .collect::<Result<_, _>>()?,
    )?;
    let mut syscalls = vec![libc::SYS_socket, libc::SYS_socketpair];
    #[cfg(target_arch = "x86_64")]
    syscalls.extend([libc::SYS_socket | X32_SYSCALL_BIT, libc::SYS_socketpair | X32_SYSCALL_BIT]);
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        syscalls.into_iter().map(|syscall| (syscall, vec![refused_family.clone()])).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .with_context(|| format!("no seccomp filter for the architecture {}", std::env::consts::ARCH))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(REFUSAL_ERRNO as u32), arch)?;
    Ok(filter.try_into()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `probe` in a forked child with the filter installed; its exit
    /// code is the test's answer.
    fn in_filtered_child(probe: fn() -> i32) -> i32 {
        let filter = socket_family_filter().unwrap();
        // SAFETY: the child only makes system calls before _exit.
        match unsafe { libc::fork() } {
            0 => {
                let code = match seccompiler::apply_filter(&filter) {
                    Ok(()) => probe(),
                    Err(_) => 100,
                };
                // SAFETY: ends the forked child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            pid => {
                let mut status = 0;
                // SAFETY: waiting for the child just forked.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                libc::WEXITSTATUS(status)
            }
        }
    }

    /// 0 when the allowed families open and the others fail with EPERM.
    fn families() -> i32 {
        let open = |family: libc::c_int, kind: libc::c_int| {
            // SAFETY: socket() has no memory arguments.
            let fd = unsafe { libc::socket(family, kind, 0) };
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if fd >= 0 {
                // SAFETY: closing the descriptor just opened.
                unsafe { libc::close(fd) };
                0
            } else {
                errno
            }
        };
        for family in ALLOWED_FAMILIES {
            let kind = if family == libc::AF_NETLINK { libc::SOCK_RAW } else { libc::SOCK_DGRAM };
            if open(family, kind) != 0 {
                return 1;
            }
        }
        for family in [libc::AF_VSOCK, libc::AF_PACKET, libc::AF_BLUETOOTH, libc::AF_ALG, 0, 4096] {
            if open(family, libc::SOCK_STREAM) != REFUSAL_ERRNO {
                return 2;
            }
        }
        // The family as the kernel reads it: high bits set do not disguise vsock.
        // SAFETY: socket(2) by number, no memory arguments.
        let disguised = unsafe { libc::syscall(libc::SYS_socket, (1i64 << 32) | libc::AF_VSOCK as i64, 1, 0) };
        if disguised >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(REFUSAL_ERRNO) {
            return 3;
        }
        let mut pair = [0; 2];
        // SAFETY: socketpair writes two descriptors into `pair`.
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) } != 0 {
            return 4;
        }
        // SAFETY: as above; vsock has no pairs, but the filter answers first.
        let refused = unsafe { libc::socketpair(libc::AF_VSOCK, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) };
        if refused == 0 || std::io::Error::last_os_error().raw_os_error() != Some(REFUSAL_ERRNO) {
            return 5;
        }
        0
    }

    #[test]
    fn only_unix_inet_inet6_and_netlink_sockets_are_created() {
        assert_eq!(in_filtered_child(families), 0);
    }
}
