//! The peer proxies (squid, tinyproxy, haproxy from Debian), started on
//! loopback with minimal configs in the bench's work directory, and stopped
//! on drop; and wrk, the keep-alive HTTP load generator.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::interrupt;

pub const PACKAGES: [&str; 4] = ["squid", "tinyproxy", "haproxy", "wrk"];
/// The packages that come with a service apt may start.
const SERVICES: [&str; 3] = ["squid", "tinyproxy", "haproxy"];
const START_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// apt may start the packages' own services: stop them, so they hold no
/// port and take no CPU while we measure (our instances use free ports anyway).
pub fn stop_distro_services() {
    for name in SERVICES {
        let running =
            Command::new("service").args([name, "status"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        if running.is_ok_and(|status| status.success()) {
            eprintln!("bench: stopping the {name} service apt started");
            let _ = Command::new("service").args([name, "stop"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
}

/// A free loopback port (the tiny race with other binders is acceptable here).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A peer proxy process; SIGTERM then SIGKILL on drop.
pub struct Daemon {
    pub port: u16,
    child: Child,
}

impl Daemon {
    /// Spawns `command` (output to `dir/NAME.out`) and waits until `port` accepts.
    fn spawn(name: &'static str, mut command: Command, dir: &Path, port: u16) -> Result<Self> {
        let output = dir.join(format!("{name}.out"));
        let file = File::create(&output)?;
        command.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        let child = command.spawn().with_context(|| format!("spawn {name}"))?;
        let mut daemon = Self { port, child };
        let deadline = Instant::now() + START_TIMEOUT;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            interrupt::check()?;
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "{name} exited ({status}) before listening: {}",
                    std::fs::read_to_string(&output).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} not listening on {address} after {START_TIMEOUT:?}: {}",
                    std::fs::read_to_string(&output).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory for one daemon's config, pid file and log, owned by the user
/// it drops privileges to.
fn daemon_dir(work: &Path, name: &str, user: &str) -> Result<PathBuf> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    let c_user = std::ffi::CString::new(user)?;
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let passwd = unsafe { libc::getpwnam(c_user.as_ptr()) };
    if passwd.is_null() {
        bail!("no user {user} for {name} (is the {name} package installed?)");
    }
    // SAFETY: non-null, just returned by getpwnam.
    let (uid, gid) = unsafe { ((*passwd).pw_uid, (*passwd).pw_gid) };
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
    Ok(dir)
}

/// CONNECT from loopback to any port; no cache, no access log, nothing on
/// disk outside the work directory.
pub fn squid(work: &Path, max_fds: u64) -> Result<Daemon> {
    let dir = daemon_dir(work, "squid", "proxy")?;
    let port = free_port()?;
    let config = dir.join("squid.conf");
    let d = dir.display();
    std::fs::write(
        &config,
        format!(
            "http_port 127.0.0.1:{port}\n\
             visible_hostname sandbox-egress-bench\n\
             acl bench_client src 127.0.0.1/32\n\
             http_access allow bench_client\n\
             http_access deny all\n\
             cache deny all\n\
             access_log none\n\
             cache_store_log none\n\
             netdb_filename none\n\
             pinger_enable off\n\
             cache_log {d}/cache.log\n\
             pid_filename {d}/squid.pid\n\
             coredump_dir {d}\n\
             shutdown_lifetime 0 seconds\n\
             max_filedescriptors {max_fds}\n\
             cache_effective_user proxy\n"
        ),
    )?;
    let mut command = Command::new("squid");
    command.arg("-N").arg("-f").arg(&config);
    Daemon::spawn("squid", command, &dir, port)
}

/// No `ConnectPort` line: tinyproxy then allows CONNECT to every port.
pub fn tinyproxy(work: &Path, max_clients: usize) -> Result<Daemon> {
    let dir = daemon_dir(work, "tinyproxy", "nobody")?;
    let port = free_port()?;
    let config = dir.join("tinyproxy.conf");
    let d = dir.display();
    std::fs::write(
        &config,
        format!(
            "User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients {max_clients}\n\
             Allow 127.0.0.1\nLogFile \"{d}/tinyproxy.log\"\nLogLevel Warning\nPidFile \"{d}/tinyproxy.pid\"\n"
        ),
    )?;
    let mut command = Command::new("tinyproxy");
    command.arg("-d").arg("-c").arg(&config);
    Daemon::spawn("tinyproxy", command, &dir, port)
}

/// How haproxy relays.
#[derive(Clone, Copy)]
pub enum HaproxyMode {
    /// Bytes, both ways.
    Tcp,
    /// HTTP requests, on keep-alive connections to the client and the server.
    Http,
}

/// One listener per target; returns the daemon and the listening port of
/// each target, in order.
pub fn haproxy(
    work: &Path,
    targets: &[SocketAddr],
    max_connections: usize,
    mode: HaproxyMode,
) -> Result<(Daemon, Vec<u16>)> {
    let dir = work.join("haproxy");
    std::fs::create_dir_all(&dir)?;
    let mode = match mode {
        HaproxyMode::Tcp => "mode tcp",
        HaproxyMode::Http => "mode http\n    option http-keep-alive\n    timeout http-keep-alive 10s",
    };
    let mut config = format!(
        "global\n    maxconn {max_connections}\n\
         defaults\n    {mode}\n    maxconn {max_connections}\n    timeout connect 10s\n    timeout client 10m\n    timeout server 10m\n"
    );
    let mut ports = Vec::with_capacity(targets.len());
    for (i, target) in targets.iter().enumerate() {
        let port = free_port()?;
        config += &format!("listen bench{i}\n    bind 127.0.0.1:{port}\n    server upstream {target}\n");
        ports.push(port);
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config)?;
    let mut command = Command::new("haproxy");
    command.arg("-db").arg("-f").arg(&path);
    let first = *ports.first().context("haproxy without targets")?;
    Ok((Daemon::spawn("haproxy", command, &dir, first)?, ports))
}
