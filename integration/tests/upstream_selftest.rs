//! Fast self-tests of the controllable upstream, using a plain hyper client (no Envoy).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use integration::upstream::{Behaviour, Stats, Upstream};

type H1 = Client<HttpConnector, Empty<Bytes>>;

async fn start() -> (Upstream, H1) {
    let up = Upstream::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (up, Client::builder(TokioExecutor::new()).build_http())
}

fn url(up: &Upstream, path_query: &str) -> String {
    format!("http://{}{}", up.addr(), path_query)
}

async fn get(client: &H1, url: String) -> (StatusCode, hyper::HeaderMap, Bytes) {
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
}

/// Polls until `f` holds, so the test does not depend on exactly when guards drop.
async fn wait_stats(up: &Upstream, f: impl Fn(&Stats) -> bool) -> Stats {
    for _ in 0..100 {
        let s = up.stats();
        if f(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    up.stats()
}

#[tokio::test]
async fn status_headers_body_and_stats() {
    let (up, c) = start().await;
    let (st, h, body) = get(&c, url(&up, "/a?status=503")).await;
    assert_eq!(st, 503);
    assert_eq!(body, "upstream: status 503\n");
    assert_eq!(h["x-upstream"], "breakwater-upstream");
    assert_eq!(h["x-upstream-seq"], "1");
    let (st, h, body) = get(&c, url(&up, "/b?body_bytes=1000")).await;
    assert_eq!((st, body.len()), (StatusCode::OK, 1000));
    assert_eq!(h["x-upstream-seq"], "2");
    assert_eq!(get(&c, url(&up, "/a?status=abc")).await.0, 400);

    let (st, _, json) = get(&c, url(&up, "/__stats")).await;
    assert_eq!(st, 200);
    let s: Stats = serde_json::from_slice(&json).unwrap();
    assert_eq!(s, up.stats());
    assert_eq!((s.requests, s.in_flight, s.resets), (3, 0, 0));
    assert_eq!(s.by_path["/a"], 2);
    assert_eq!(s.responses_by_status[&503], 1);
    assert_eq!(s.responses_by_status[&400], 1);

    // Default behaviour via API and via control endpoint; query still overrides it.
    up.set_default(Behaviour { status: 418, ..Behaviour::default() });
    assert_eq!(get(&c, url(&up, "/c")).await.0, 418);
    assert_eq!(get(&c, url(&up, "/c?status=200")).await.0, 200);
    let post = |pq: &str| Request::post(url(&up, pq)).body(Empty::new()).unwrap();
    assert_eq!(c.request(post("/__default?status=502")).await.unwrap().status(), 200);
    assert_eq!(get(&c, url(&up, "/c")).await.0, 502);
    assert_eq!(c.request(post("/__default")).await.unwrap().status(), 200);
    assert_eq!(get(&c, url(&up, "/c")).await.0, 200);
    assert_eq!(c.request(post("/__reset")).await.unwrap().status(), 200);
    assert_eq!(up.stats(), Stats::default());
}

#[tokio::test]
async fn delay_is_applied() {
    let (up, c) = start().await;
    let t = std::time::Instant::now();
    assert_eq!(get(&c, url(&up, "/slow?delay_ms=300")).await.0, 200);
    assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
}

#[tokio::test]
async fn fail_every_third_per_path() {
    let (up, c) = start().await;
    let mut got = Vec::new();
    for _ in 0..7 {
        got.push(get(&c, url(&up, "/flaky?fail_every=3")).await.0.as_u16());
    }
    assert_eq!(got, [200, 200, 503, 200, 200, 503, 200]);
    // Counters are per path, and fail_status picks the failure code.
    assert_eq!(get(&c, url(&up, "/other?fail_every=2&fail_status=500")).await.0, 200);
    assert_eq!(get(&c, url(&up, "/other?fail_every=2&fail_status=500")).await.0, 500);
}

#[tokio::test]
async fn max_in_flight_counts_concurrent_requests() {
    let (up, c) = start().await;
    let handles: Vec<_> = (0..5)
        .map(|_| {
            let (c, u) = (c.clone(), url(&up, "/conc?delay_ms=300"));
            tokio::spawn(async move { get(&c, u).await.0 })
        })
        .collect();
    for h in handles {
        assert_eq!(h.await.unwrap(), 200);
    }
    let s = wait_stats(&up, |s| s.in_flight == 0).await;
    assert_eq!((s.max_in_flight, s.in_flight, s.requests), (5, 0, 5));
}

#[tokio::test]
async fn in_flight_released_when_client_gives_up() {
    let (up, c) = start().await;
    let pending = c.get(url(&up, "/hang?delay_ms=5000").parse().unwrap());
    assert!(tokio::time::timeout(Duration::from_millis(200), pending).await.is_err());
    let s = wait_stats(&up, |s| s.in_flight == 0).await;
    assert_eq!((s.in_flight, s.max_in_flight, s.requests), (0, 1, 1));
}

#[tokio::test]
async fn reset_gives_client_error_on_h1_and_h2() {
    let (up, c) = start().await;
    assert!(c.get(url(&up, "/r?reset=1").parse().unwrap()).await.is_err());
    let h2: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    assert!(h2.get(url(&up, "/r?reset=1&delay_ms=50").parse().unwrap()).await.is_err());
    // The HTTP/2 connection survives a stream reset.
    assert_eq!(h2.get(url(&up, "/r").parse().unwrap()).await.unwrap().status(), 200);
    let s = wait_stats(&up, |s| s.in_flight == 0).await;
    assert_eq!((s.resets, s.in_flight, s.requests), (2, 0, 3));
}

#[tokio::test]
async fn grpc_trailers_over_h2() {
    let (up, _) = start().await;
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let grpc = |pq: &str| {
        Request::post(url(&up, pq))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap()
    };

    let resp = h2.request(grpc("/svc/Method?grpc_status=14")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let body = resp.into_body().collect().await.unwrap();
    let trailers = body.trailers().cloned().unwrap();
    assert_eq!(trailers["grpc-status"], "14");
    assert_eq!(trailers["grpc-message"], "upstream");
    assert!(body.to_bytes().is_empty());

    // Implicit gRPC: OK status with one empty message frame.
    let resp = h2.request(grpc("/svc/Method")).await.unwrap();
    let body = resp.into_body().collect().await.unwrap();
    assert_eq!(body.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(&body.to_bytes()[..], &[0, 0, 0, 0, 0]);
}

#[tokio::test]
async fn drop_stops_serving() {
    let (up, c) = start().await;
    let u = url(&up, "/x");
    assert_eq!(get(&c, u.clone()).await.0, 200);
    drop(up);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fresh: H1 = Client::builder(TokioExecutor::new()).build_http();
    assert!(fresh.get(u.parse().unwrap()).await.is_err());
}
