//! TLS backends started by a test (feature `tls`): a certificate authority made on the spot, and
//! a Redis server or a PostgreSQL cluster of the test's own that speaks TLS with a certificate it
//! signed, on a free port of the loopback interface.
//!
//! Each backend is a child process stopped when its value is dropped. Without `redis-server` or
//! PostgreSQL's `initdb` on the machine, `start` returns `None` after a loud SKIP, and panics
//! under `CI=true`.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// How long a backend may take to start.
const START: Duration = Duration::from_secs(30);

/// A fresh directory of its own under the system's temporary directory.
fn scratch(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fawkes-tls-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn skip<T>(what: &str) -> Option<T> {
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{what}");
    eprintln!("\n*** SKIP: {what} ***\n");
    None
}

/// A certificate authority, a server certificate it signed for `localhost` and `127.0.0.1`, and
/// the certificate of another authority that signed nothing here, as PEM files in a directory.
#[derive(Debug)]
pub struct Pki {
    /// The directory holding the files.
    pub dir: PathBuf,
    /// The CA's certificate (the root a client trusts).
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    /// Another CA's certificate: a client trusting only it refuses the server.
    pub other_ca: PathBuf,
}

impl Pki {
    /// Makes the authority and the certificates.
    ///
    /// # Panics
    /// When a key cannot be generated or a file written.
    pub fn new() -> Pki {
        let dir = scratch("pki");
        let ca = authority("Fawkes test CA");
        let other = authority("Another CA");
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("server names");
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca).expect("sign the server certificate");
        let pki = Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            other_ca: dir.join("other-ca.pem"),
            dir,
        };
        std::fs::write(&pki.ca, ca.pem()).expect("write ca.pem");
        std::fs::write(&pki.other_ca, other.pem()).expect("write other-ca.pem");
        std::fs::write(&pki.cert, cert.pem()).expect("write server.pem");
        std::fs::write(&pki.key, key.serialize_pem()).expect("write server.key");
        pki
    }
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("self-sign the CA")
}

/// Reads `from` until a line contains `ready`; the lines read are returned in the panic message
/// when the process ends first or [`START`] passes.
fn await_line(child: &mut Child, from: impl std::io::Read + Send + 'static, ready: &'static str, what: &str) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = false;
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if !seen && line.contains(ready) {
                seen = true;
                let _ = tx.send(Ok(()));
            } else if !seen {
                let _ = tx.send(Err(line));
            }
        }
    });
    let mut log = Vec::new();
    let deadline = std::time::Instant::now() + START;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(())) => return,
            Ok(Err(line)) => log.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("{what} did not start within {START:?}:\n{}", log.join("\n"));
            }
        }
    }
}

/// A `redis-server` answering only TLS, with [`Pki::cert`], on 127.0.0.1.
#[derive(Debug)]
pub struct TlsRedis {
    child: Child,
    /// The TLS port.
    pub port: u16,
}

impl TlsRedis {
    /// Starts the server; `None` (after a loud SKIP) without `redis-server` or TLS in it.
    ///
    /// # Panics
    /// Under `CI=true` when there is no `redis-server`; when it does not start.
    pub fn start(pki: &Pki) -> Option<TlsRedis> {
        let port = free_port();
        let spawned = Command::new("redis-server")
            .current_dir(&pki.dir)
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "127.0.0.2"])
            .arg("--tls-cert-file")
            .arg(&pki.cert)
            .arg("--tls-key-file")
            .arg(&pki.key)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca)
            .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => return skip(&format!("cannot run redis-server for a TLS Redis: {e}")),
        };
        let stdout = child.stdout.take().expect("piped stdout");
        await_line(&mut child, stdout, "Ready to accept connections", "redis-server with TLS");
        Some(TlsRedis { child, port })
    }

    /// `rediss://HOST:PORT` for this server.
    pub fn url(&self, host: &str) -> String {
        format!("rediss://{host}:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL cluster of its own (`initdb` in a temporary directory) with `ssl = on` and
/// [`Pki::cert`], on 127.0.0.1; user `postgres`, trust authentication, database `postgres`.
#[derive(Debug)]
pub struct TlsPostgres {
    child: Child,
    data: PathBuf,
    /// The port.
    pub port: u16,
}

/// The newest PostgreSQL's binaries directory (Debian's layout), or the one `pg_config` names.
fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let bin = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    bin.join("initdb").is_file().then_some(bin)
}

/// The `postgres` user's uid and gid when this process is root (PostgreSQL refuses to run as
/// root), `None` otherwise.
fn postgres_user() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = Command::new("id").args(args).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    if id(&["-u"])? != 0 {
        return None;
    }
    let user = (id(&["-u", "postgres"]), id(&["-g", "postgres"]));
    match user {
        (Some(uid), Some(gid)) => Some((uid, gid)),
        _ => panic!("running as root and there is no postgres user to run PostgreSQL as"),
    }
}

/// A command run as the `postgres` user when this process is root.
fn as_postgres(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    #[cfg(unix)]
    if let Some((uid, gid)) = postgres_user() {
        use std::os::unix::process::CommandExt as _;
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn chown_postgres(path: &Path) {
    if postgres_user().is_some() {
        let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status().is_ok_and(|s| s.success());
        assert!(ok, "chown -R postgres {}", path.display());
    }
}

impl TlsPostgres {
    /// Creates and starts the cluster; `None` (after a loud SKIP) without PostgreSQL's binaries.
    ///
    /// # Panics
    /// Under `CI=true` when PostgreSQL's binaries are missing; when the cluster cannot be made.
    pub fn start(pki: &Pki) -> Option<TlsPostgres> {
        let Some(bin) = pg_bin() else { return skip("no PostgreSQL binaries (initdb) for a TLS PostgreSQL") };
        let dir = scratch("pg");
        let data = dir.join("data");
        // The server reads its key as its own user, and refuses a key others can read.
        let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
        std::fs::copy(&pki.cert, &cert).expect("copy server.pem");
        std::fs::copy(&pki.key, &key).expect("copy server.key");
        set_mode(&key, 0o600);
        chown_postgres(&dir);
        let init = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("run initdb");
        assert!(init.status.success(), "initdb failed: {}", String::from_utf8_lossy(&init.stderr));
        let port = free_port();
        let mut child = as_postgres(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1,127.0.0.2",
                "-c",
                "ssl=on",
                "-c",
                "fsync=off",
            ])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .arg("-c")
            .arg(format!("ssl_cert_file={}", cert.display()))
            .arg("-c")
            .arg(format!("ssl_key_file={}", key.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start postgres");
        let stderr = child.stderr.take().expect("piped stderr");
        await_line(&mut child, stderr, "ready to accept connections", "PostgreSQL with ssl=on");
        Some(TlsPostgres { child, data: dir, port })
    }

    /// `postgres://postgres@HOST:PORT/postgres?QUERY` for this cluster.
    pub fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.port)
    }
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) {}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown.
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
