//! A sandbox's spec, and `--sandboxes DIR`: one YAML spec per sandbox,
//! followed as files come, change and go.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::Daemon;

/// How often the spec directory is read for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Spec files read from the directory; more are refused (and logged).
const MAX_SPEC_FILES: usize = 1024;
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
    /// Port of its loopback listener (0: any free port).
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
            spec.name = stem(path).unwrap_or_default();
        }
        spec.check_name().with_context(|| format!("sandbox spec {}", path.display()))?;
        Ok(spec)
    }
}

fn stem(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    Some(name.strip_suffix(".yaml").or_else(|| name.strip_suffix(".yml"))?.to_owned())
}

type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// A spec file as last read: its stamp, and the sandbox it made (if valid).
struct Followed {
    stamp: Stamp,
    sandbox: Option<String>,
}

/// Loads every `*.yaml`/`*.yml` of `dir` now, then follows the directory:
/// a new file adds its sandbox, a changed one replaces it (its in-flight
/// connections go on), a removed one removes it (fail closed: its cgroup
/// stays redirected to a closed port). An invalid file is logged and
/// leaves the sandbox it made before as it was.
pub async fn follow_dir(daemon: Arc<Daemon>, dir: PathBuf) -> Result<()> {
    if !dir.is_dir() {
        bail!("--sandboxes {}: not a directory", dir.display());
    }
    let mut followed = BTreeMap::new();
    scan(&daemon, &dir, &mut followed);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            scan(&daemon, &dir, &mut followed);
        }
    });
    Ok(())
}

fn spec_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| stem(path).is_some_and(|stem| !stem.starts_with('.')) && path.is_file())
        .collect();
    files.sort();
    if files.len() > MAX_SPEC_FILES {
        tracing::error!(dir = %dir.display(), files = files.len(), "more than {MAX_SPEC_FILES} sandbox specs: the rest are ignored");
        files.truncate(MAX_SPEC_FILES);
    }
    files
}

fn scan(daemon: &Daemon, dir: &Path, followed: &mut BTreeMap<PathBuf, Followed>) {
    let files = spec_files(dir);
    let gone: Vec<PathBuf> = followed.keys().filter(|path| !files.contains(path)).cloned().collect();
    for path in gone {
        if let Some(Followed { sandbox: Some(name), .. }) = followed.remove(&path) {
            if let Err(error) = daemon.remove(&name, false, false) {
                tracing::error!(spec = %path.display(), "sandbox spec removed: {error:#}");
            }
        }
    }
    for path in files {
        let now = stamp(&path);
        let previous = followed.get(&path);
        if previous.is_some_and(|previous| previous.stamp == now) {
            continue;
        }
        let before = previous.and_then(|previous| previous.sandbox.clone());
        let sandbox = match SandboxSpec::from_file(&path).and_then(|spec| daemon.apply(spec, before.as_deref())) {
            Ok(name) => Some(name),
            Err(error) => {
                tracing::error!(event = "sandbox_spec_refused", spec = %path.display(), "{error:#}");
                before
            }
        };
        followed.insert(path, Followed { stamp: now, sandbox });
    }
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
        assert_eq!(stem(Path::new("/d/x.yml")).as_deref(), Some("x"));
        assert_eq!(stem(Path::new("/d/x.json")), None);
    }
}
