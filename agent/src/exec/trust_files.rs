//! The bundle and truststore `exec` points a program's trust variables at:
//! `<trust dir>/ca-<first 16 hex digits of the CA's SHA-256>/`, so daemons
//! with different CAs never share files. Directories and files are root's,
//! readable by everyone and writable by root only. Each `exec` builds the
//! bundle anew and rewrites both files when it differs from the one there
//! (changed system roots; a new CA gets a directory of its own), each
//! replaced at once, so a program reading them sees the old or the new.

use std::{
    ffi::OsString,
    fs, io,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use ring::digest::{digest, SHA256};

use super::BUNDLE_VARIABLES;
use crate::tls::{write_readable_file, TrustBundle, TRUSTSTORE_PASSWORD};

pub const DEFAULT_TRUST_DIR: &str = "/run/sandbox-egress-trust";
const BUNDLE_FILE: &str = "ca-bundle.pem";
const TRUSTSTORE_FILE: &str = "truststore.p12";

pub struct TrustFiles {
    bundle: PathBuf,
    truststore: PathBuf,
}

impl TrustFiles {
    /// The files for `bundle` under `trust_dir`, written if missing or stale.
    pub fn ensure(trust_dir: &Path, bundle: &TrustBundle) -> Result<Self> {
        // JAVA_TOOL_OPTIONS is split at whitespace.
        if trust_dir.to_string_lossy().chars().any(char::is_whitespace) {
            bail!("--trust-dir {}: a path with whitespace cannot be given to Java", trust_dir.display());
        }
        let pem = bundle.pem();
        let agent_ca = digest(&SHA256, bundle.agent_ca_der());
        let hex: String = agent_ca.as_ref()[..8].iter().map(|byte| format!("{byte:02x}")).collect();
        let dir = trust_dir.join(format!("ca-{hex}"));
        root_only_writable_dir(trust_dir)?;
        root_only_writable_dir(&dir)?;
        let files = Self { bundle: dir.join(BUNDLE_FILE), truststore: dir.join(TRUSTSTORE_FILE) };
        // The bundle is written last: when it is current, so is the truststore.
        let current = match fs::read(&files.bundle) {
            Ok(existing) => existing == pem.as_bytes() && files.truststore.exists(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => false,
            Err(error) => return Err(error).with_context(|| format!("read {}", files.bundle.display())),
        };
        if !current {
            write_readable_file(&files.truststore, &bundle.pkcs12()?)?;
            write_readable_file(&files.bundle, pem.as_bytes())?;
            tracing::info!(
                bundle = %files.bundle.display(),
                truststore = %files.truststore.display(),
                certificates = bundle.count(),
                "wrote the trust bundle and truststore (the system roots and the agent CA)"
            );
        }
        Ok(files)
    }

    /// The bundle variables, and JAVA_TOOL_OPTIONS (`java_options`, the
    /// caller's, kept) with the truststore last, so it wins.
    pub fn variables(&self, java_options: Option<OsString>) -> Vec<(&'static str, OsString)> {
        let mut variables: Vec<(&'static str, OsString)> =
            BUNDLE_VARIABLES.iter().map(|name| (*name, self.bundle.clone().into_os_string())).collect();
        let mut java = java_options.filter(|options| !options.is_empty()).unwrap_or_default();
        if !java.is_empty() {
            java.push(" ");
        }
        java.push(format!(
            "-Djavax.net.ssl.trustStore={} -Djavax.net.ssl.trustStoreType=PKCS12 \
             -Djavax.net.ssl.trustStorePassword={TRUSTSTORE_PASSWORD}",
            self.truststore.display()
        ));
        variables.push(("JAVA_TOOL_OPTIONS", java));
        variables
    }
}

/// Makes `dir` (mode 0755) if missing; an existing one must be a directory
/// (not a symlink) of root's that nobody else may write to, since the
/// files in it decide what sandboxed programs trust.
fn root_only_writable_dir(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .with_context(|| format!("chmod 755 {}", dir.display()))?,
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error).with_context(|| format!("create {}", dir.display())),
    }
    let metadata = fs::symlink_metadata(dir).with_context(|| format!("inspect {}", dir.display()))?;
    if !metadata.is_dir() || metadata.uid() != 0 || metadata.mode() & 0o022 != 0 {
        bail!(
            "{} must be a directory of root's that only root may write to (it holds what sandboxed programs \
             trust): remove it, or give another --trust-dir",
            dir.display()
        );
    }
    Ok(())
}
