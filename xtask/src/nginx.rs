//! nginx as the load balancer in front of the API instances, run in the foreground as a child
//! process with its configuration, pid, temporary paths and logs in a directory of its own.
//!
//! It terminates TLS (a self-signed certificate for `localhost` and 127.0.0.1, made once with
//! openssl) and also listens in plain HTTP on 127.0.0.1, for local measurement tools that do not
//! speak TLS (the project's load generator); both proxy the same way. Connections to the
//! instances are kept alive; an instance that refuses or drops a connection is skipped for a
//! while (passive health) and the request is retried on another, the batch included: it only
//! reads, so it may be sent twice.
//!
//! The instances keep their ports across restarts, so the upstream list is fixed for the life of
//! the process: there is no reload.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tokio::process::Command;

use crate::stack::answers_200;
use crate::topology::{Foreground, find_program, stop_stale, tail};

/// How long start-up may take before it is an error.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a stop waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long nginx leaves out an instance after a failed attempt (`max_fails=1`), per worker: a
/// rolling restart waits this long after an instance is ready before stopping the next, or every
/// instance may be left out at once (nginx's 502 "no live upstreams").
pub const FAIL_TIMEOUT: Duration = Duration::from_secs(2);

/// What nginx serves and where it sends it.
#[derive(Debug, Clone)]
pub struct NginxConfig {
    /// HTTPS port on 127.0.0.1.
    pub https_port: u16,
    /// Plain-HTTP port on 127.0.0.1, for local tools that do not speak TLS.
    pub http_port: u16,
    /// The API instances' addresses (on 127.0.0.1, or each on a host of its own).
    pub upstreams: Vec<std::net::SocketAddr>,
    /// PEM certificate chain.
    pub certificate: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl NginxConfig {
    /// The `nginx.conf` text, with every path that nginx writes under `dir`.
    pub fn render(&self, dir: &Path) -> String {
        let dir = dir.display();
        let servers: String = self
            .upstreams
            .iter()
            .map(|address| {
                let fail_timeout = FAIL_TIMEOUT.as_secs();
                format!("        server {address} max_fails=1 fail_timeout={fail_timeout}s;\n")
            })
            .collect();
        format!(
            "# Written by cargo xtask at each start.\n\
worker_processes auto;\n\
pid {dir}/nginx.pid;\n\
error_log {dir}/error.log warn;\n\
events {{ worker_connections 4096; }}\n\
http {{\n\
    access_log off;\n\
    server_tokens off;\n\
    client_body_temp_path {dir}/temp/body;\n\
    proxy_temp_path {dir}/temp/proxy;\n\
    fastcgi_temp_path {dir}/temp/fastcgi;\n\
    uwsgi_temp_path {dir}/temp/uwsgi;\n\
    scgi_temp_path {dir}/temp/scgi;\n\
    # Bodies and answers stay in memory (the API takes at most 64 KiB): the workers never need\n\
    # a temporary file, so they need no access to this directory.\n\
    client_max_body_size 128k;\n\
    client_body_buffer_size 128k;\n\
    proxy_max_temp_file_size 0;\n\
    keepalive_timeout 60s;\n\
    keepalive_requests 100000;\n\
\n\
    # The client's request id when it sent one, else nginx's own.\n\
    map $http_x_request_id $dashboard_request_id {{\n\
        \"\" $request_id;\n\
        default $http_x_request_id;\n\
    }}\n\
\n\
    upstream dashboard_api {{\n\
{servers}\
        keepalive 64;\n\
        # Below the API's keep_alive (5 s), so nginx closes an idle connection before the API does.\n\
        keepalive_timeout 4s;\n\
        keepalive_requests 100000;\n\
    }}\n\
\n\
    server {{\n\
        listen 127.0.0.1:{https} ssl;\n\
        # Plain HTTP, on 127.0.0.1 only: for local measurement tools that do not speak TLS.\n\
        listen 127.0.0.1:{http};\n\
        server_name localhost;\n\
        ssl_certificate {certificate};\n\
        ssl_certificate_key {key};\n\
        ssl_protocols TLSv1.2 TLSv1.3;\n\
        ssl_session_cache shared:TLS:1m;\n\
\n\
        location / {{\n\
            proxy_pass http://dashboard_api;\n\
            proxy_http_version 1.1;\n\
            proxy_set_header Connection \"\";\n\
            proxy_set_header Host $host;\n\
            # Authorization and every other request header pass through unchanged.\n\
            proxy_set_header X-Request-Id $dashboard_request_id;\n\
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
            proxy_set_header X-Forwarded-Proto $scheme;\n\
            proxy_connect_timeout 500ms;\n\
            # Above the batch's 10 s deadline: the API answers before nginx gives up.\n\
            proxy_send_timeout 15s;\n\
            proxy_read_timeout 15s;\n\
            # A refused, reset or timed-out request goes to another instance, the batch too\n\
            # (it only reads). Not a 503: that is the API's own answer (database down, load\n\
            # shed, with Retry-After) and would be the same elsewhere; counted as a failure it\n\
            # would mark every instance down and turn it into nginx's 502.\n\
            proxy_next_upstream error timeout http_502 non_idempotent;\n\
            proxy_next_upstream_tries 3;\n\
            proxy_next_upstream_timeout 10s;\n\
        }}\n\
    }}\n\
}}\n",
            https = self.https_port,
            http = self.http_port,
            certificate = self.certificate.display(),
            key = self.key.display(),
        )
    }
}

/// nginx running in the foreground.
#[derive(Debug)]
pub struct Nginx {
    dir: PathBuf,
    process: Foreground,
    /// HTTPS port on 127.0.0.1.
    pub https_port: u16,
    /// Plain-HTTP port on 127.0.0.1.
    pub http_port: u16,
}

impl Nginx {
    /// Writes `config` into `dir/nginx.conf` and starts nginx with it, returning once an
    /// instance's `/healthz` answers 200 through it and the HTTPS port accepts connections. An
    /// nginx left running there by a run that died is stopped first.
    ///
    /// # Errors
    ///
    /// When nginx is not installed, refuses the configuration, or does not listen within 10 s
    /// (the error shows its log's last lines).
    pub async fn start(dir: &Path, config: &NginxConfig) -> Result<Self> {
        std::fs::create_dir_all(dir.join("temp"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        stop_stale(&dir.join("nginx.pid"), "nginx").await;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config.render(&dir))
            .with_context(|| format!("cannot write {}", conf.display()))?;
        let log = dir.join("error.log");
        let mut command = Command::new(find_program("nginx")?);
        command
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&log)
            .args(["-g", "daemon off;"]);
        let output = dir.join("nginx.out");
        let mut process = Foreground::spawn(command, "nginx", &output)?;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = process.exited()? {
                bail!(
                    "nginx exited during start-up ({status}):\n{}",
                    tail(&output, 10)
                );
            }
            // An instance's answer through the plain listener, so it is this nginx that listens.
            let plain = format!("127.0.0.1:{}", config.http_port);
            let listening = answers_200(&plain, "/healthz").await
                && tokio::net::TcpStream::connect(("127.0.0.1", config.https_port))
                    .await
                    .is_ok();
            if listening {
                return Ok(Self {
                    dir,
                    process,
                    https_port: config.https_port,
                    http_port: config.http_port,
                });
            }
            if Instant::now() >= deadline {
                let _ = process.stop(Signal::SIGKILL, STOP_GRACE).await;
                bail!(
                    "nginx did not listen on 127.0.0.1:{} and :{} within {START_DEADLINE:?}. \
                     Last lines of {}:\n{}",
                    config.https_port,
                    config.http_port,
                    log.display(),
                    tail(&log, 10)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `https://127.0.0.1:PORT` (the certificate names 127.0.0.1 and `localhost`).
    pub fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.https_port)
    }

    /// `http://127.0.0.1:PORT`, the plain-HTTP listener.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The master process's id.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Its error log.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("error.log")
    }

    /// Stops it: SIGTERM (fast shutdown, open connections closed), SIGKILL after 5 s.
    ///
    /// # Errors
    ///
    /// When waiting for it fails.
    pub async fn stop(self) -> Result<()> {
        self.process.stop(Signal::SIGTERM, STOP_GRACE).await
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1 (EC P-256, valid two years) in `dir`,
/// made with openssl the first time and reused after. Returns the certificate's and the key's
/// paths.
///
/// # Errors
///
/// When openssl is missing or fails.
pub fn self_signed_certificate(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    let (certificate, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if certificate.is_file() && key.is_file() {
        return Ok((certificate, key));
    }
    crate::pg::openssl(
        &[
            &["req", "-x509", "-newkey", "ec"],
            &["-pkeyopt", "ec_paramgen_curve:prime256v1", "-noenc"],
            &["-days", "730", "-subj", "/CN=localhost"],
            &["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        ],
        &key,
        &certificate,
    )?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", key.display()))?;
    Ok((certificate, key))
}
