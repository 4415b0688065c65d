//! What a sandboxed program trusts: the system's roots plus the agent's CA,
//! as one PEM bundle (OpenSSL, curl, Python, Node, git, pip, the AWS SDKs)
//! and as a PKCS#12 truststore for Java, whose entries carry Java's
//! trusted-certificate attribute (a PKCS#12 certificate without it is not a
//! trust anchor to Java).

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use anyhow::{bail, Context, Result};
use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use p12_keystore::{Certificate, KeyStore, KeyStoreEntry};
use rustls::pki_types::{pem::PemObject, CertificateDer};

/// The truststore's password: Java reads the certificates of a PKCS#12
/// file only with it. The JDK's own default, for a file that holds no
/// secret (public certificates only).
pub const TRUSTSTORE_PASSWORD: &str = "changeit";
/// The agent CA's alias in the truststore; the system roots are `system-N`.
const AGENT_CA_ALIAS: &str = "sandbox-egress-agent-ca";

/// The roots to trust besides the agent's CA: the PEM file `file`, or the
/// system's as rustls-native-certs finds them (`SSL_CERT_FILE` or
/// `SSL_CERT_DIR` when set, else the distribution's store).
pub fn load_system_roots(file: Option<&Path>) -> Result<Vec<CertificateDer<'static>>> {
    let Some(file) = file else {
        let loaded = rustls_native_certs::load_native_certs();
        for error in &loaded.errors {
            tracing::warn!("loading system root certificates: {error}");
        }
        return Ok(loaded.certs);
    };
    let shown = file.display();
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
        .with_context(|| format!("cannot read {shown}"))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid PEM in {shown}"))?;
    if roots.is_empty() {
        bail!("no certificate in {shown}");
    }
    Ok(roots)
}

/// The system roots and the agent's CA, each once, in that order.
pub struct TrustBundle {
    system_roots: Vec<Certificate>,
    agent_ca: Certificate,
}

impl TrustBundle {
    /// A root that does not parse as X.509 is left out of both forms (with a
    /// warning): Java could not load it, and no client could use it.
    pub fn new(system_roots: &[CertificateDer<'_>], agent_ca_pem: &str) -> Result<Self> {
        let agent_ca = CertificateDer::from_pem_slice(agent_ca_pem.as_bytes()).context("the agent CA's PEM")?;
        let agent_ca = Certificate::from_der(&agent_ca).context("the agent CA's certificate")?;
        let mut kept: Vec<Certificate> = Vec::with_capacity(system_roots.len());
        let mut unusable = 0;
        for root in system_roots {
            match Certificate::from_der(root) {
                Ok(root) if root != agent_ca && !kept.contains(&root) => kept.push(root),
                Ok(_) => {}
                Err(_) => unusable += 1,
            }
        }
        if unusable > 0 {
            tracing::warn!("{unusable} system root certificates do not parse and are left out of the bundle");
        }
        if kept.is_empty() {
            tracing::warn!("no system root certificates: the bundle trusts the agent's CA only");
        }
        Ok(Self { system_roots: kept, agent_ca })
    }

    /// Certificates in the bundle.
    pub fn count(&self) -> usize {
        self.system_roots.len() + 1
    }

    pub fn agent_ca_der(&self) -> &[u8] {
        self.agent_ca.as_der()
    }

    fn certificates(&self) -> impl Iterator<Item = &Certificate> {
        self.system_roots.iter().chain([&self.agent_ca])
    }

    /// Every certificate as PEM, one after another.
    pub fn pem(&self) -> String {
        let mut pem = String::new();
        for certificate in self.certificates() {
            pem.push_str("-----BEGIN CERTIFICATE-----\n");
            let encoded = BASE64.encode(certificate.as_der());
            for line in encoded.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
        }
        pem
    }

    /// A PKCS#12 truststore (password [`TRUSTSTORE_PASSWORD`]) of trusted
    /// certificate entries: `system-1`... and `sandbox-egress-agent-ca`.
    pub fn pkcs12(&self) -> Result<Vec<u8>> {
        let mut store = KeyStore::new();
        for (n, root) in self.system_roots.iter().enumerate() {
            store.add_entry(&format!("system-{}", n + 1), KeyStoreEntry::Certificate(root.clone()));
        }
        store.add_entry(AGENT_CA_ALIAS, KeyStoreEntry::Certificate(self.agent_ca.clone()));
        store.writer(TRUSTSTORE_PASSWORD).write().context("write the PKCS#12 truststore")
    }
}

/// Replaces `path` with `contents`, mode 0644 (the caller's, readable by
/// everyone), all at once: a reader sees the old file or the new one.
pub fn write_readable_file(path: &Path, contents: &[u8]) -> Result<()> {
    let shown = path.display();
    let name = path.file_name().with_context(|| format!("{shown} names no file"))?;
    let staged = path.with_file_name(format!(".{}.{}", name.to_string_lossy(), std::process::id()));
    let _ = fs::remove_file(&staged);
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&staged)
        .and_then(|mut file| {
            // The mode above is masked by the umask.
            file.set_permissions(fs::Permissions::from_mode(0o644))?;
            file.write_all(contents)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&staged, path));
    if let Err(error) = written {
        let _ = fs::remove_file(&staged);
        return Err(error).with_context(|| format!("write {shown}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use p12_keystore::Pkcs12ImportPolicy;

    use super::*;
    use crate::tls::AgentCa;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn the_bundle_holds_each_root_once_and_the_agent_ca_last() {
        let (ca, other) = (AgentCa::ephemeral(), AgentCa::ephemeral());
        let roots = [der(other.cert_pem()), der(other.cert_pem()), der(ca.cert_pem()), CertificateDer::from(vec![1])];
        let bundle = TrustBundle::new(&roots, ca.cert_pem()).unwrap();
        assert_eq!(bundle.count(), 2, "the duplicate, the agent CA among the roots and the garbage are dropped");
        let pem = bundle.pem();
        let parsed: Vec<CertificateDer> = CertificateDer::pem_slice_iter(pem.as_bytes()).map(Result::unwrap).collect();
        assert_eq!(parsed, [der(other.cert_pem()), der(ca.cert_pem())]);
    }

    #[test]
    fn the_truststore_reads_back_as_trusted_certificates() {
        let (ca, other) = (AgentCa::ephemeral(), AgentCa::ephemeral());
        let bundle = TrustBundle::new(&[der(other.cert_pem())], ca.cert_pem()).unwrap();
        let p12 = bundle.pkcs12().unwrap();
        // Strict import keeps only certificates marked trusted.
        let store = KeyStore::from_pkcs12(&p12, TRUSTSTORE_PASSWORD, Pkcs12ImportPolicy::Strict).unwrap();
        let aliases: Vec<&String> = store.entries().map(|(alias, _)| alias).collect();
        assert_eq!(aliases, ["sandbox-egress-agent-ca", "system-1"]);
        let Some(KeyStoreEntry::Certificate(agent_ca)) = store.entry(AGENT_CA_ALIAS) else { panic!("no CA entry") };
        assert_eq!(agent_ca.as_der(), der(ca.cert_pem()).as_ref());
    }

    #[test]
    fn a_roots_file_without_certificates_is_an_error() {
        let path = std::env::temp_dir().join(format!("se-trust-test-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let error = load_system_roots(Some(&path)).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(error.contains("no certificate in"), "{error}");
    }
}
