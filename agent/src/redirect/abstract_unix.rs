//! Abstract unix sockets are out of a sandbox's reach: `cgroup/connect_unix`
//! and `cgroup/sendmsg_unix` (Linux 6.7+) refuse an abstract destination
//! unless its name is in the allowed map (`run --allow-abstract-unix`).
//! Path sockets stay under file permissions.
//!
//! aya 0.14 cannot load these attach types, and the check needs the
//! address, which a unix hook's context exposes only through the kernel's
//! `struct bpf_sock_addr_kern` (`uaddr` at 8, `uaddrlen` at 32, stable since
//! the hooks came in 6.7): so the program is assembled here, twenty-odd
//! instructions, and reads that struct with bpf_probe_read_kernel.

use std::os::fd::{BorrowedFd, OwnedFd};

use anyhow::Result;

use super::raw_bpf::{self, BPF_CGROUP_UNIX_CONNECT, BPF_CGROUP_UNIX_SENDMSG, BPF_PROG_TYPE_CGROUP_SOCK_ADDR};

/// Loads the program for both hooks; `allowed` is the map of allowed names
/// (`AbstractName` keys: the name's length, then the name zero padded).
/// Returns (attach type, pin name, program) for each hook.
pub fn load(allowed: BorrowedFd<'_>) -> Result<[(u32, &'static str, OwnedFd); 2]> {
    let instructions = program(allowed);
    let [connect_pin, sendmsg_pin] = super::ABSTRACT_UNIX_PINS;
    let load =
        |attach_type| raw_bpf::prog_load(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, attach_type, "abstract_unix", &instructions);
    Ok([
        (BPF_CGROUP_UNIX_CONNECT, connect_pin, load(BPF_CGROUP_UNIX_CONNECT)?),
        (BPF_CGROUP_UNIX_SENDMSG, sendmsg_pin, load(BPF_CGROUP_UNIX_SENDMSG)?),
    ])
}

// Registers and the stack layout of the program.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const FP: u8 = 10;
/// bpf_sock_addr_kern is read to fp-48 (40 bytes): uaddr at fp-40, uaddrlen at fp-16.
const CTX_COPY: i16 = -48;
/// The map key (108 bytes) is built at fp-112: sun_path read over it, then
/// its first byte (the NUL of an abstract name) replaced by the name length.
const KEY: i16 = -112;
const KEY_LEN: i32 = 108;
const SOCKADDR_UN_LEN: i32 = 110;

const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_PROBE_READ_KERNEL: i32 = 113;
const BPF_PSEUDO_MAP_FD: u8 = 1;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code) | u64::from(dst | (src << 4)) << 8 | u64::from(off as u16) << 16 | u64::from(imm as u32) << 32
}

fn mov_reg(dst: u8, src: u8) -> u64 {
    insn(0xbf, dst, src, 0, 0)
}
fn mov_imm(dst: u8, imm: i32) -> u64 {
    insn(0xb7, dst, 0, 0, imm)
}
fn add_imm(dst: u8, imm: i32) -> u64 {
    insn(0x07, dst, 0, 0, imm)
}
fn call(helper: i32) -> u64 {
    insn(0x85, 0, 0, 0, helper)
}
fn load_u64(dst: u8, src: u8, off: i16) -> u64 {
    insn(0x79, dst, src, off, 0)
}
fn load_u32(dst: u8, src: u8, off: i16) -> u64 {
    insn(0x61, dst, src, off, 0)
}
fn load_u8(dst: u8, src: u8, off: i16) -> u64 {
    insn(0x71, dst, src, off, 0)
}
fn store_u8(dst: u8, src: u8, off: i16) -> u64 {
    insn(0x73, dst, src, off, 0)
}
fn store_zero_u64(dst: u8, off: i16) -> u64 {
    insn(0x7a, dst, 0, off, 0)
}
fn jump_if_not_equal(dst: u8, imm: i32, off: i16) -> u64 {
    insn(0x55, dst, 0, off, imm)
}
fn jump_if_less(dst: u8, imm: i32, off: i16) -> u64 {
    insn(0xa5, dst, 0, off, imm)
}
fn jump_if_greater(dst: u8, imm: i32, off: i16) -> u64 {
    insn(0x25, dst, 0, off, imm)
}
fn exit() -> u64 {
    insn(0x95, 0, 0, 0, 0)
}

/// A label-free assembler: jumps name their target, resolved at the end.
#[derive(Default)]
struct Assembler {
    code: Vec<u64>,
    /// (index of a jump, its target label)
    jumps: Vec<(usize, Label)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Label {
    Allow,
    Reject,
}

impl Assembler {
    fn push(&mut self, instruction: u64) {
        self.code.push(instruction);
    }

    fn jump(&mut self, instruction: impl Fn(i16) -> u64, target: Label) {
        self.jumps.push((self.code.len(), target));
        self.code.push(instruction(0));
    }

    /// Appends the refusal (where the code falls through to) and the allowance.
    fn finish(mut self) -> Vec<u64> {
        let reject = self.code.len();
        self.push(mov_imm(R0, 0));
        self.push(exit());
        let allow = self.code.len();
        self.push(mov_imm(R0, 1));
        self.push(exit());
        for (at, label) in self.jumps {
            let target = if label == Label::Allow { allow } else { reject };
            let offset = (target - at - 1) as i16;
            self.code[at] = (self.code[at] & !0xffff_0000) | u64::from(offset as u16) << 16;
        }
        self.code
    }
}

fn program(allowed: BorrowedFd<'_>) -> Vec<u64> {
    use std::os::fd::AsRawFd;
    let mut asm = Assembler::default();
    asm.push(mov_reg(R6, R1));
    // Copy the kernel context: uaddr and uaddrlen.
    asm.push(mov_reg(R1, FP));
    asm.push(add_imm(R1, i32::from(CTX_COPY)));
    asm.push(mov_imm(R2, 40));
    asm.push(mov_reg(R3, R6));
    asm.push(call(BPF_FUNC_PROBE_READ_KERNEL));
    asm.jump(|off| jump_if_not_equal(R0, 0, off), Label::Reject);
    asm.push(load_u64(R7, FP, CTX_COPY + 8));
    asm.push(load_u32(R8, FP, CTX_COPY + 32));
    // Unnamed (autobind) addresses have no name; longer than sockaddr_un is invalid.
    asm.jump(|off| jump_if_less(R8, 3, off), Label::Allow);
    asm.jump(|off| jump_if_greater(R8, SOCKADDR_UN_LEN, off), Label::Reject);
    // Zero the key, then read the address's sun_path bytes over it.
    for word in 0..(KEY_LEN + 7) / 8 {
        asm.push(store_zero_u64(FP, KEY + (word * 8) as i16));
    }
    asm.push(mov_reg(R1, FP));
    asm.push(add_imm(R1, i32::from(KEY)));
    asm.push(mov_reg(R2, R8));
    asm.push(add_imm(R2, -2));
    asm.push(mov_reg(R3, R7));
    asm.push(add_imm(R3, 2));
    asm.push(call(BPF_FUNC_PROBE_READ_KERNEL));
    asm.jump(|off| jump_if_not_equal(R0, 0, off), Label::Reject);
    // A path name starts with a non-zero byte.
    asm.push(load_u8(R1, FP, KEY));
    asm.jump(|off| jump_if_not_equal(R1, 0, off), Label::Allow);
    asm.push(add_imm(R8, -3));
    asm.push(store_u8(FP, R8, KEY));
    // Allowed names are in the map.
    asm.push(insn(0x18, R1, BPF_PSEUDO_MAP_FD, 0, allowed.as_raw_fd()));
    asm.push(0);
    asm.push(mov_reg(R2, FP));
    asm.push(add_imm(R2, i32::from(KEY)));
    asm.push(call(BPF_FUNC_MAP_LOOKUP_ELEM));
    asm.jump(|off| jump_if_not_equal(R0, 0, off), Label::Allow);
    asm.finish() // Falls through to the refusal.
}
