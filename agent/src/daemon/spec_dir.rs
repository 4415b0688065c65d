//! `--sandboxes DIR`: one YAML spec per sandbox, followed as files come,
//! change and go.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Result};

use super::Daemon;
use crate::control::{spec_file_stem, SandboxSpec};

/// How often the spec directory is read for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Spec files read from the directory; more are refused (and logged).
const MAX_SPEC_FILES: usize = 1024;

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
        .filter(|path| spec_file_stem(path).is_some_and(|stem| !stem.starts_with('.')) && path.is_file())
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
