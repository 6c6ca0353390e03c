//! Standalone controllable upstream for the demo and manual Envoy runs.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use integration::upstream::Upstream;

const USAGE: &str = "usage: breakwater-upstream [--listen ADDR:PORT]   (default 127.0.0.1:8081)";

fn parse_args() -> Result<SocketAddr, String> {
    let mut listen = "127.0.0.1:8081".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs a value")?,
            "-h" | "--help" => return Err(String::new()),
            other => match other.strip_prefix("--listen=") {
                Some(v) => listen = v.to_owned(),
                None => return Err(format!("unknown argument {other:?}")),
            },
        }
    }
    listen.parse().map_err(|e| format!("bad --listen {listen:?}: {e}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let addr = match parse_args() {
        Ok(addr) => addr,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("breakwater-upstream: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let upstream = match Upstream::start(addr).await {
        Ok(u) => u,
        Err(e) => {
            eprintln!("breakwater-upstream: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Scripts wait for this exact line to learn the bound port.
    let mut out = std::io::stdout().lock();
    if writeln!(out, "breakwater-upstream listening on {}", upstream.addr()).and_then(|_| out.flush()).is_err() {
        return ExitCode::FAILURE;
    }
    drop(out);
    if let Err(e) = shutdown_signal().await {
        eprintln!("breakwater-upstream: signal handling failed: {e}");
        return ExitCode::FAILURE;
    }
    drop(upstream);
    ExitCode::SUCCESS
}

async fn shutdown_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}
