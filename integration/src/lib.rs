//! The real-Envoy test kit: the controllable upstream, the Envoy harness, and the usual setup.

pub mod envoy;
pub mod istio;
pub mod upstream;

use envoy::{Envoy, Spec};
use upstream::Upstream;

/// The test upstream on a free loopback port.
pub async fn start_upstream() -> Upstream {
    Upstream::start("127.0.0.1:0".parse().expect("loopback address")).await.expect("start the test upstream")
}

/// The test upstream, and Envoy (2 workers) in front of it with one route `/<name>` per policy
/// of `policies` (a JSON object of policy bodies by name); see [`Spec::one_route_per_policy`].
pub async fn setup(policies: serde_json::Value) -> (Upstream, Envoy) {
    let up = start_upstream().await;
    let envoy = Envoy::start(&Spec::one_route_per_policy(up.addr(), policies)).await;
    (up, envoy)
}

/// As [`setup`], with each policy attached as its own per-route filter instance
/// (see [`envoy::Attach::PerRoute`]).
pub async fn setup_per_route(policies: serde_json::Value) -> (Upstream, Envoy) {
    let up = start_upstream().await;
    let spec = Spec::one_route_per_policy(up.addr(), policies).attach(envoy::Attach::PerRoute);
    let envoy = Envoy::start(&spec).await;
    (up, envoy)
}

/// The `breakwater` CLI under test: `BREAKWATER_CLI`, else the workspace's debug build (which
/// `make integration` builds first).
pub fn cli_bin() -> std::path::PathBuf {
    let path = std::env::var_os("BREAKWATER_CLI")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| envoy::repo_root().join("target/debug/breakwater"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p breakwater-cli` (make integration does)",
        path.display()
    );
    path
}
