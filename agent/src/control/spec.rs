//! A sandbox's spec: `sandbox add` flags, a file of `--sandboxes DIR`, or
//! the `run --cgroup --policy` shorthand.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

const MAX_SPEC_BYTES: u64 = 64 * 1024;

/// One sandbox: `sandbox add` flags, a file of `--sandboxes DIR`, or the
/// `run --cgroup --policy` shorthand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// 1 to 64 of `A-Z a-z 0-9 . _ -`; in a spec file, the file's name
    /// without `.yaml` when left out.
    #[serde(default)]
    pub name: String,
    /// Its cgroup v2 directory (and every cgroup below it).
    pub cgroup: PathBuf,
    /// Its policy file, reloaded on change and on SIGHUP.
    pub policy: PathBuf,
    /// A network namespace of its own: `/run/netns/NAME` or `/proc/PID/ns/net`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// Its inference.local providers and route; without one, inference.local is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_config: Option<PathBuf>,
    /// Port of its loopback listener; 0: the daemon's shared listener (with
    /// `netns`, one of its own on any free port).
    #[serde(default)]
    pub listen_port: u16,
    /// Connections of one of its cgroups relayed at once (default: the
    /// daemon's `--max-connections-per-sandbox`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
}

impl SandboxSpec {
    pub fn check_name(&self) -> Result<()> {
        let name = &self.name;
        let valid = (1..=64).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !name.starts_with('.');
        if !valid {
            bail!("sandbox name {name:?}: 1 to 64 characters of A-Z a-z 0-9 . _ - (not starting with .)");
        }
        Ok(())
    }

    /// Reads a spec file; its name defaults to the file's stem.
    pub fn from_file(path: &Path) -> Result<Self> {
        let size = std::fs::metadata(path).with_context(|| format!("read {}", path.display()))?.len();
        if size > MAX_SPEC_BYTES {
            bail!("{}: a sandbox spec is at most {MAX_SPEC_BYTES} bytes", path.display());
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let mut spec: Self =
            serde_norway::from_str(&text).with_context(|| format!("sandbox spec {}", path.display()))?;
        if spec.name.is_empty() {
            spec.name = spec_file_stem(path).unwrap_or_default();
        }
        spec.check_name().with_context(|| format!("sandbox spec {}", path.display()))?;
        Ok(spec)
    }
}

/// A spec file's name without `.yaml` (or `.yml`); `None` for other files.
pub fn spec_file_stem(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    Some(name.strip_suffix(".yaml").or_else(|| name.strip_suffix(".yml"))?.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_default_to_the_file_and_are_checked() {
        let dir = std::env::temp_dir().join(format!("sandbox-egress-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("web-1.yaml");
        std::fs::write(&file, "cgroup: /sys/fs/cgroup/web\npolicy: /etc/p.yaml\nnetns: /run/netns/web\n").unwrap();
        let spec = SandboxSpec::from_file(&file).unwrap();
        assert_eq!((spec.name.as_str(), spec.netns.as_deref()), ("web-1", Some(Path::new("/run/netns/web"))));
        std::fs::write(&file, "name: \"a b\"\ncgroup: /c\npolicy: /p\n").unwrap();
        let error = format!("{:#}", SandboxSpec::from_file(&file).unwrap_err());
        assert!(error.contains("1 to 64 characters"), "{error}");
        std::fs::write(&file, "cgroup: /c\npolicy: /p\nlisten: 1\n").unwrap();
        let error = format!("{:#}", SandboxSpec::from_file(&file).unwrap_err());
        assert!(error.contains("unknown field `listen`"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(spec_file_stem(Path::new("/d/x.yml")).as_deref(), Some("x"));
        assert_eq!(spec_file_stem(Path::new("/d/x.json")), None);
    }
}
