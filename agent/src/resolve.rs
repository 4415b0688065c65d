//! Name resolution for policy checks: which addresses a host name stands for.
//!
//! The agent resolves names itself (never trusting the sandbox's answer) to
//! check that an SNI or Host matches the address the sandbox connected to,
//! and to apply the private-IP gate to plain HTTP.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result};
use hickory_resolver::{
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    TokioResolver,
};

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
const LOOKUP_ATTEMPTS: usize = 2;

pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// `nameserver`: query this server (UDP, TCP fallback) instead of the
    /// system's /etc/resolv.conf.
    pub fn new(nameserver: Option<SocketAddr>) -> Result<Self> {
        let mut builder = match nameserver {
            None => TokioResolver::builder_tokio().context("read the system resolver configuration")?,
            Some(server) => {
                let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                    .into_iter()
                    .map(|mut connection| {
                        connection.port = server.port();
                        connection
                    })
                    .collect();
                let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(server.ip(), true, connections)]);
                TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            }
        };
        let options = builder.options_mut();
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.timeout = LOOKUP_TIMEOUT;
        options.attempts = LOOKUP_ATTEMPTS;
        Ok(Self { inner: builder.build().context("build the resolver")? })
    }

    /// Every address `host` resolves to (A and AAAA). An IP literal is its own answer.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        // Fully qualified: the agent's answer must not depend on search domains.
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        let answer = self.inner.lookup_ip(fqdn).await.map_err(|error| format!("cannot resolve {host}: {error}"))?;
        let addresses: Vec<IpAddr> = answer.iter().collect();
        if addresses.is_empty() {
            return Err(format!("{host} has no addresses"));
        }
        Ok(addresses)
    }
}
