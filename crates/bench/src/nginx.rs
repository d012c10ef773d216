//! nginx in front of the upstream: what one relay hop written in C costs on this machine.
//!
//! "Direct" is the physical limit of the workload, but not of a gateway: any gateway is a second
//! process between the client and the upstream, so each chunk is read from one socket and written
//! to another, and each request is a second HTTP exchange, on the same cores as the client and the
//! upstream. nginx as a plain reverse proxy (`proxy_buffering off`, upstream keep-alive) does that
//! and nothing else (no parsing of the events, no transcript, no accounting): what it adds to
//! direct is the floor for what any relay process adds here, the cost of the hop itself. The
//! report puts sluice's added latency and throughput next to it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::measure::{client, Target};

/// Where Debian's package puts nginx (`scripts/ensure-nginx` installs it).
pub(crate) const DEFAULT_BIN: &str = "/usr/sbin/nginx";

/// A running nginx, proxying to the upstream; stopped when dropped.
pub(crate) struct Nginx {
    _child: tokio::process::Child,
    base: String,
    /// Its config, pid file and logs, removed after the process is killed (fields drop in order).
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts `bin` in the foreground, one worker process (as sluice's figures are for one
    /// process), proxying every path to `upstream` (`http://host:port`) over kept-alive HTTP/1.1
    /// connections, unbuffered both ways.
    pub(crate) async fn start(bin: &Path, upstream: &str) -> anyhow::Result<Nginx> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::Builder::new()
            .prefix("sluice-bench-nginx-")
            .tempdir()?;
        let d = dir.path().display();
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .trim_end_matches("/v1");
        let conf: PathBuf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
                 upstream up {{ server {upstream}; keepalive 1024; }}\n\
                 server {{\n  listen 127.0.0.1:{port};\n  keepalive_requests 1000000;\n\
                 location / {{\n   proxy_pass http://up;\n   proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\";\n   proxy_buffering off;\n\
                 proxy_request_buffering off;\n   proxy_read_timeout 3600s;\n  }}\n }}\n}}\n"
            ),
        )?;
        let child = tokio::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..200 {
            if reqwest::get(format!("{base}/healthz")).await.is_ok() {
                return Ok(Nginx {
                    _child: child,
                    base: format!("{base}/v1"),
                    _dir: dir,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "nginx did not start: {}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        )
    }

    /// nginx as a benchmark target: the upstream's own model, through the hop.
    pub(crate) fn target(&self) -> Target {
        Target {
            id: "nginx",
            name: "nginx (a relay hop in C)".into(),
            base: self.base.clone(),
            key: None,
            model: "sim",
            client: client(),
            stamps: true,
        }
    }
}
