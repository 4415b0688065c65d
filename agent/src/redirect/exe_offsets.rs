//! Where the calling task's executable is, in the running kernel's structs
//! (task->mm->exe_file->f_inode: i_ino, i_generation, i_sb->s_dev): offsets read from its
//! BTF, handed to the programs as globals, since they walk the structs with
//! bpf_probe_read_kernel (aya's programs have no CO-RE).

use anyhow::{bail, Context, Result};
use aya::EbpfLoader;
use btf_rs::{Btf, Type};

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// (global in the programs, struct, member path).
const OFFSETS: [(&str, &str, &str); 7] = [
    ("TASK_MM_OFFSET", "task_struct", "mm"),
    ("MM_EXE_FILE_OFFSET", "mm_struct", "exe_file"),
    ("FILE_INODE_OFFSET", "file", "f_inode"),
    ("INODE_INO_OFFSET", "inode", "i_ino"),
    ("INODE_SB_OFFSET", "inode", "i_sb"),
    ("INODE_GENERATION_OFFSET", "inode", "i_generation"),
    ("SB_DEV_OFFSET", "super_block", "s_dev"),
];

/// The offsets, in bytes, as the programs' globals want them.
pub(super) struct ExeOffsets(Vec<(&'static str, u32)>);

impl ExeOffsets {
    pub fn read() -> Result<Self> {
        let btf = Btf::from_file(VMLINUX_BTF).with_context(|| format!("read {VMLINUX_BTF}"))?;
        let mut offsets = Vec::new();
        for (global, structure, member) in OFFSETS {
            let bits = member_offset(&btf, structure, member)
                .with_context(|| format!("struct {structure}.{member} in {VMLINUX_BTF}"))?;
            offsets.push((global, bits / 8));
        }
        Ok(Self(offsets))
    }

    pub fn set<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        for (global, offset) in &self.0 {
            loader.override_global(global, offset, true);
        }
        loader.override_global("EXE_OFFSETS_KNOWN", &1u32, true);
    }
}

/// The bit offset of `member` in `struct structure`, found through the
/// anonymous structs and unions it may be nested in.
fn member_offset(btf: &Btf, structure: &str, member: &str) -> Result<u32> {
    for candidate in btf.resolve_types_by_name(structure)? {
        if let Type::Struct(found) = candidate {
            if let Some(offset) = find_member(btf, &found, member, 0)? {
                return Ok(offset);
            }
        }
    }
    bail!("no such member")
}

/// Anonymous members are nested at most this deep.
const MAX_NESTING: usize = 4;

fn find_member(btf: &Btf, within: &btf_rs::Struct, member: &str, depth: usize) -> Result<Option<u32>> {
    for candidate in &within.members {
        let name = btf.resolve_name(candidate).unwrap_or_default();
        if name == member {
            return Ok(Some(candidate.bit_offset()));
        }
        if !name.is_empty() || depth >= MAX_NESTING {
            continue;
        }
        if let Type::Struct(inner) | Type::Union(inner) = btf.resolve_chained_type(candidate)? {
            if let Some(offset) = find_member(btf, &inner, member, depth + 1)? {
                return Ok(Some(candidate.bit_offset() + offset));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernel_has_every_offset() {
        let offsets = ExeOffsets::read().unwrap();
        assert_eq!(offsets.0.len(), OFFSETS.len());
        // struct file's f_inode and inode's i_sb are never at the very start.
        assert!(offsets
            .0
            .iter()
            .filter(|(global, _)| global.starts_with("FILE") || global.contains("SB_OFF"))
            .all(|(_, offset)| *offset > 0));
    }
}
