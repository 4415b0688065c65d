//! Where a credential is read from: an environment variable of the agent,
//! or a file.

use std::{
    fs::{File, Metadata},
    io::{self, Read},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::Secret;

/// A key or token is far shorter; a larger file is not a credential.
const MAX_CREDENTIAL_FILE_BYTES: u64 = 16 * 1024;

/// Exactly one of `env` and `file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl CredentialSource {
    /// Reads the value now: a rotated key file or a changed environment
    /// takes effect on the next call. Errors say where the value was
    /// looked for, never what it was.
    pub fn read(&self) -> Result<Secret, String> {
        match (&self.env, &self.file) {
            (Some(variable), None) => read_env(variable),
            (None, Some(path)) => {
                let mut file = open(path)?;
                read_file(path, &mut file)
            }
            _ => Err("credential needs exactly one of env and file".into()),
        }
    }

    /// Why `env` or `file` cannot be used, if so (without reading it).
    pub fn check(&self) -> Result<(), String> {
        match (&self.env, &self.file) {
            (Some(variable), None) if variable.is_empty() || variable.contains(['=', '\0']) => {
                Err(format!("env: {variable:?} is not an environment variable name"))
            }
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err("needs exactly one of env and file".into()),
        }
    }
}

pub(super) fn read_env(variable: &str) -> Result<Secret, String> {
    let value = std::env::var(variable).map_err(|error| match error {
        std::env::VarError::NotPresent => format!("environment variable {variable} is not set"),
        std::env::VarError::NotUnicode(_) => format!("environment variable {variable} is not UTF-8"),
    })?;
    Secret::new(&value).map_err(|reason| format!("environment variable {variable} {reason}"))
}

fn open(path: &Path) -> Result<File, String> {
    File::open(path).map_err(|error| format!("cannot read credential file {}: {}", path.display(), io_reason(&error)))
}

fn read_file(path: &Path, file: &mut File) -> Result<Secret, String> {
    let shown = path.display();
    let mut value = zeroize::Zeroizing::new(String::new());
    file.take(MAX_CREDENTIAL_FILE_BYTES + 1)
        .read_to_string(&mut value)
        .map_err(|error| format!("cannot read credential file {shown}: {}", io_reason(&error)))?;
    if value.len() as u64 > MAX_CREDENTIAL_FILE_BYTES {
        return Err(format!("credential file {shown} is larger than {MAX_CREDENTIAL_FILE_BYTES} bytes"));
    }
    Secret::new(&value).map_err(|reason| format!("credential file {shown} {reason}"))
}

/// An I/O error's kind only: `read_to_string` on a non-UTF-8 file reports
/// nothing of the contents either way, but this keeps it certain.
fn io_reason(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::InvalidData => "not UTF-8 text".into(),
        _ => error.kind().to_string(),
    }
}

/// A secret file that only the agent's user may read or change: owned by
/// it, no permission bit for group or others, a regular file.
pub fn check_private(path: &Path, metadata: &Metadata) -> Result<(), String> {
    let shown = path.display();
    if !metadata.is_file() {
        return Err(format!("credential file {shown} is not a regular file"));
    }
    let mode = metadata.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "credential file {shown} is readable or writable by group or others (mode {mode:o}): chmod 600 it"
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let agent_uid = unsafe { libc::geteuid() };
    if metadata.uid() != agent_uid {
        return Err(format!(
            "credential file {shown} is owned by uid {}, not by the agent's uid {agent_uid}: chown it",
            metadata.uid()
        ));
    }
    Ok(())
}

/// A root-only secret file, read on every use: a rotated token is used
/// from the next request on, without a restart (a token is a few bytes, and
/// reading it each time never misses a rewrite that kept its size and time).
pub struct SecretFile {
    path: PathBuf,
}

impl SecretFile {
    /// Checks and reads the file now, so a missing or unsafe one stops the
    /// agent at start-up.
    pub fn open(path: &Path) -> Result<SecretFile, String> {
        let file = SecretFile { path: path.to_owned() };
        file.current()?;
        Ok(file)
    }

    /// The value now. Ownership and mode are checked on the opened file
    /// every time, so the check and the bytes are of one file, and a file
    /// opened to others later stops being used.
    pub fn current(&self) -> Result<Secret, String> {
        let mut file = open(&self.path)?;
        let metadata = file
            .metadata()
            .map_err(|error| format!("cannot read credential file {}: {}", self.path.display(), io_reason(&error)))?;
        check_private(&self.path, &metadata)?;
        read_file(&self.path, &mut file)
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt};

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("se-unit-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(path: &Path, value: &str, mode: u32) {
        fs::write(path, value).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_file_open_to_group_or_others_is_refused_without_quoting_it() {
        let dir = temp_dir("perm");
        let path = dir.join("token");
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            write(&path, "tok-secret", mode);
            let error = SecretFile::open(&path).err().expect("refused");
            assert!(error.contains("readable or writable by group or others"), "{mode:o}: {error}");
            assert!(error.contains(&format!("mode {mode:o}")), "{error}");
            assert!(!error.contains("tok-secret"), "{error}");
        }
        write(&path, "tok-secret\n", 0o600);
        let file = SecretFile::open(&path).expect("private file");
        assert_eq!(file.current().unwrap().expose(), "tok-secret");
        // Opened to others later: no longer used.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(file.current().unwrap_err().contains("chmod 600"));
        let error = SecretFile::open(&dir).err().unwrap();
        assert!(error.contains("not a regular file"), "{error}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_changed_file_is_read_again() {
        let dir = temp_dir("rotate");
        let path = dir.join("token");
        write(&path, "first", 0o600);
        let file = SecretFile::open(&path).unwrap();
        assert_eq!(file.current().unwrap().expose(), "first");
        // Rewritten in place with the same size, then replaced by a rename.
        write(&path, "secnd", 0o600);
        assert_eq!(file.current().unwrap().expose(), "secnd");
        let staged = dir.join("staged");
        write(&staged, "third-token", 0o600);
        fs::rename(&staged, &path).unwrap();
        assert_eq!(file.current().unwrap().expose(), "third-token");
        fs::remove_file(&path).unwrap();
        let error = file.current().unwrap_err();
        assert!(error.contains("cannot read credential file") && error.contains("not found"), "{error}");
        let _ = fs::remove_dir_all(&dir);
    }
}
