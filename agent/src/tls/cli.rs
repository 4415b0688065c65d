//! `sandbox-egress ca export|bundle|truststore`: the agent's CA, and what a
//! sandboxed program trusts (as `exec` sets it up), for container images and
//! programs started some other way.

use std::{
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
};

use anyhow::{bail, Result};

use super::{load_system_roots, write_readable_file, AgentCa, TrustBundle, DEFAULT_CA_DIR};

#[derive(clap::Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate (PEM) for sandbox trust stores, creating the CA on first use.
    Export {
        #[arg(long, default_value = DEFAULT_CA_DIR)]
        ca_dir: PathBuf,
    },
    /// Write the trust bundle (PEM): the system roots and the CA, what
    /// `exec` points SSL_CERT_FILE and the like at.
    Bundle {
        #[command(flatten)]
        source: BundleSource,
        /// Write it here (mode 0644) instead of to stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Write the Java truststore (PKCS#12, password `changeit`) of the same
    /// certificates, each a trusted certificate entry.
    Truststore {
        #[command(flatten)]
        source: BundleSource,
        /// Write it here (mode 0644) instead of to stdout (not a terminal).
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
pub struct BundleSource {
    /// The daemon's CA directory (its `run --ca-dir`).
    #[arg(long, default_value = DEFAULT_CA_DIR)]
    ca_dir: PathBuf,
    /// A PEM file of the roots trusted besides the agent's CA. Default: the
    /// system's (SSL_CERT_FILE or SSL_CERT_DIR when set, else the
    /// distribution's store).
    #[arg(long, value_name = "FILE")]
    system_roots: Option<PathBuf>,
}

impl BundleSource {
    fn bundle(&self) -> Result<TrustBundle> {
        let ca = AgentCa::load_or_create(&self.ca_dir)?;
        TrustBundle::new(&load_system_roots(self.system_roots.as_deref())?, ca.cert_pem())
    }
}

pub fn run(command: CaCommand) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`sandbox-egress ca` must run as root: the CA's directory is root's only");
    }
    match command {
        CaCommand::Export { ca_dir } => {
            print!("{}", AgentCa::load_or_create(&ca_dir)?.cert_pem());
            Ok(())
        }
        CaCommand::Bundle { source, output } => write(output.as_deref(), source.bundle()?.pem().as_bytes()),
        CaCommand::Truststore { source, output } => {
            if output.is_none() && std::io::stdout().is_terminal() {
                bail!("the truststore is binary: give --output FILE, or redirect stdout");
            }
            write(output.as_deref(), &source.bundle()?.pkcs12()?)
        }
    }
}

fn write(output: Option<&Path>, contents: &[u8]) -> Result<()> {
    match output {
        Some(path) => write_readable_file(path, contents),
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(contents)?;
            Ok(stdout.flush()?)
        }
    }
}
