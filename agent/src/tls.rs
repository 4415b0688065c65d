//! The agent's own certificate authority, and the leaf certificates it
//! serves where it terminates TLS (inference.local, nowhere else).
//!
//! The CA is created on first run (rcgen, ECDSA P-256) in a 0700 directory,
//! both files 0600; sandboxes trust it through `sandbox-egress ca export`.
//! Leaf certificates are made in memory at start-up and never written.

use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

pub const DEFAULT_CA_DIR: &str = "/var/lib/sandbox-egress/ca";
const CERT_FILE: &str = "ca.pem";
const KEY_FILE: &str = "ca-key.pem";

pub struct AgentCa {
    cert_pem: String,
    key: KeyPair,
}

impl AgentCa {
    /// Loads the CA from `dir`, creating it on first run.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if key_path.exists() {
            return Self::load(&cert_path, &key_path);
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
        let key = KeyPair::generate().context("generate the CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "sandbox-egress agent CA");
        params.distinguished_name.push(DnType::OrganizationName, "sandbox-egress");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).context("self-sign the CA certificate")?;
        write_private(&key_path, &key.serialize_pem())?;
        write_private(&cert_path, &cert.pem())?;
        tracing::info!(ca = %cert_path.display(), "created the agent CA (sandboxes trust it via `sandbox-egress ca export`)");
        Ok(Self { cert_pem: cert.pem(), key })
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self> {
        let mode = fs::metadata(key_path)?.permissions().mode();
        if mode & 0o077 != 0 {
            bail!("{} is readable by others (mode {:o}): chmod 600 it", key_path.display(), mode & 0o777);
        }
        let key =
            KeyPair::from_pem(&fs::read_to_string(key_path).with_context(|| format!("read {}", key_path.display()))?)
                .with_context(|| format!("parse {}", key_path.display()))?;
        let cert_pem = fs::read_to_string(cert_path).with_context(|| format!("read {}", cert_path.display()))?;
        Ok(Self { cert_pem, key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A TLS acceptor for `name`, with a fresh leaf certificate signed by the
    /// CA. Only HTTP/1.1 is offered: the agent parses what it terminates.
    pub fn acceptor(&self, name: &str) -> Result<TlsAcceptor> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).context("parse the CA certificate")?;
        let leaf_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params.signed_by(&leaf_key, &issuer)?;
        let ca_der = rustls_pemfile_der(&self.cert_pem)?;
        let chain = vec![leaf.der().clone(), ca_der];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// The DER of the (single) certificate in `pem`.
fn rustls_pemfile_der(pem: &str) -> Result<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).context("parse the CA certificate PEM")
}

fn write_private(path: &PathBuf, contents: &str) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA directory for one test, removed on drop (failing tests included).
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("se-ca-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    #[test]
    fn ca_is_created_private_and_reloaded_unchanged() {
        let guard = temp_dir("create");
        let dir = &guard.0;
        let created = AgentCa::load_or_create(dir).unwrap();
        assert_eq!(fs::metadata(dir).unwrap().permissions().mode() & 0o777, 0o700);
        for file in [CERT_FILE, KEY_FILE] {
            assert_eq!(fs::metadata(dir.join(file)).unwrap().permissions().mode() & 0o777, 0o600, "{file}");
        }
        let loaded = AgentCa::load_or_create(dir).unwrap();
        assert_eq!(created.cert_pem(), loaded.cert_pem());
        assert!(loaded.acceptor("inference.local").is_ok());
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let guard = temp_dir("perms");
        let dir = &guard.0;
        AgentCa::load_or_create(dir).unwrap();
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let error = AgentCa::load_or_create(dir).err().unwrap().to_string();
        assert!(error.contains("readable by others"), "{error}");
    }

    #[tokio::test]
    async fn leaf_certificate_verifies_against_the_ca() {
        let guard = temp_dir("leaf");
        let ca = AgentCa::load_or_create(&guard.0).unwrap();
        let acceptor = ca.acceptor("inference.local").unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls_pemfile_der(ca.cert_pem()).unwrap()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { acceptor.accept(server_io).await.map(drop) });
        let name = rustls::pki_types::ServerName::try_from("inference.local").unwrap();
        let client = connector.connect(name, client_io).await.expect("the client trusts the leaf through the CA");
        server.await.unwrap().unwrap();
        drop(client);
    }
}
