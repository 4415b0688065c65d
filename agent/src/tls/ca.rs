//! The agent's own certificate authority, which signs the leaf
//! certificates it serves where it terminates TLS: inference.local, and the
//! names of endpoints whose traffic it inspects ([`super::LeafCache`]).
//!
//! The CA is created on first run (rcgen, ECDSA P-256) in a 0700 directory,
//! both files 0600; sandboxes trust it through `sandbox-egress ca export`.
//! Leaf certificates are made in memory and never written.

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
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::{CertifiedKey, SingleCertAndKey},
};
use tokio_rustls::TlsAcceptor;

pub const DEFAULT_CA_DIR: &str = "/var/lib/sandbox-egress/ca";
const CERT_FILE: &str = "ca.pem";
const KEY_FILE: &str = "ca-key.pem";

pub struct AgentCa {
    cert_pem: String,
    /// Sent after each leaf, so clients that trust the CA can build the chain.
    cert_der: CertificateDer<'static>,
    /// Parsed once: every leaf is signed with it.
    issuer: Issuer<'static, KeyPair>,
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
        let (cert_pem, key) = generate()?;
        write_private(&key_path, &key.serialize_pem())?;
        write_private(&cert_path, &cert_pem)?;
        tracing::info!(ca = %cert_path.display(), "created the agent CA (sandboxes trust it via `sandbox-egress ca export`)");
        Self::from_parts(cert_pem, key)
    }

    /// A CA that lives in memory only, for tests.
    #[cfg(test)]
    pub(crate) fn ephemeral() -> Self {
        let (cert_pem, key) = generate().unwrap();
        Self::from_parts(cert_pem, key).unwrap()
    }

    fn from_parts(cert_pem: String, key: KeyPair) -> Result<Self> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("parse the CA certificate PEM")?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).context("parse the CA certificate")?;
        Ok(Self { cert_pem, cert_der, issuer })
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
        Self::from_parts(cert_pem, key).with_context(|| format!("load {}", cert_path.display()))
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A TLS acceptor for `name`, with a fresh leaf certificate signed by the
    /// CA. Only HTTP/1.1 is offered: the agent parses what it terminates.
    pub fn acceptor(&self, name: &str) -> Result<TlsAcceptor> {
        let mut config = super::server::http1_server_config()?;
        config.cert_resolver = Arc::new(SingleCertAndKey::from(self.leaf(name)?));
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// A new key and a certificate for `name` (a DNS name, or an IP address
    /// literal for an IP address SAN), followed by the CA's certificate.
    pub(super) fn leaf(&self, name: &str) -> Result<CertifiedKey> {
        let leaf_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_owned()])
            .with_context(|| format!("{name:?} cannot be a certificate name"))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params.signed_by(&leaf_key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)?;
        Ok(CertifiedKey::new(vec![leaf.der().clone(), self.cert_der.clone()], signing_key))
    }
}

/// A new CA: its certificate (PEM) and key.
fn generate() -> Result<(String, KeyPair)> {
    let key = KeyPair::generate().context("generate the CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "sandbox-egress agent CA");
    params.distinguished_name.push(DnType::OrganizationName, "sandbox-egress");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).context("self-sign the CA certificate")?;
    Ok((cert.pem(), key))
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
        roots.add(ca.cert_der.clone()).unwrap();
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
