//! Fast self-tests of the controllable upstream, using a plain hyper client (no Envoy).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use integration::upstream::{Arrival, Behaviour, Stats, Upstream};

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

#[tokio::test]
async fn in_flight_is_counted_by_tag() {
    let (up, c) = start().await;
    let spawn = |pq: &str| {
        let (c, u) = (c.clone(), url(&up, pq));
        tokio::spawn(async move { get(&c, u).await.0 })
    };
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(spawn("/t?tag=bg&delay_ms=300"));
    }
    handles.push(spawn("/t?tag=crit&delay_ms=300"));
    handles.push(spawn("/t?delay_ms=300"));
    let s = wait_stats(&up, |s| s.in_flight == 5).await;
    assert_eq!(s.in_flight_by_tag.get("bg"), Some(&3), "{s:?}");
    assert_eq!(s.in_flight_by_tag.get("crit"), Some(&1), "{s:?}");
    assert_eq!(s.in_flight_by_tag.len(), 2, "untagged requests are not listed: {s:?}");

    // A reset while they run keeps what is in flight, by tag too.
    up.reset_stats();
    let s = up.stats();
    assert_eq!((s.in_flight, s.max_in_flight, s.requests), (5, 5, 0), "{s:?}");
    assert_eq!(s.in_flight_by_tag, s.max_in_flight_by_tag, "{s:?}");
    assert_eq!(s.in_flight_by_tag.get("bg"), Some(&3), "{s:?}");

    for h in handles {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(get(&c, url(&up, "/t?tag=crit")).await.0, 200);
    let s = wait_stats(&up, |s| s.in_flight == 0).await;
    assert_eq!(s.in_flight_by_tag.values().sum::<u64>(), 0, "{s:?}");
    assert_eq!(s.max_in_flight_by_tag.get("bg"), Some(&3), "{s:?}");
    assert_eq!(s.max_in_flight_by_tag.get("crit"), Some(&1), "{s:?}");

    // The JSON form carries the tags.
    let (_, _, json) = get(&c, url(&up, "/__stats")).await;
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v["max_in_flight_by_tag"]["bg"], 3, "{v}");
    assert_eq!(v["in_flight_by_tag"]["bg"], 0, "{v}");
}

#[tokio::test]
async fn arrival_log_records_ids_in_order_with_times() {
    let (up, c) = start().await;
    let t0 = up.now_us();
    // `a` is slow; `b` and `c` arrive while it runs, one after the other; untagged `x` is not logged.
    let slow = {
        let (c, u) = (c.clone(), url(&up, "/l?id=a&delay_ms=200"));
        tokio::spawn(async move { get(&c, u).await.0 })
    };
    let s = wait_stats(&up, |s| s.in_flight == 1).await;
    assert_eq!(s.arrivals.len(), 1, "{s:?}");
    assert_eq!((s.arrivals[0].id.as_str(), s.arrivals[0].finished_us), ("a", 0), "running: not finished yet");
    assert_eq!(get(&c, url(&up, "/l?id=b&delay_ms=20")).await.0, 200);
    assert_eq!(get(&c, url(&up, "/l?id=c")).await.0, 200);
    assert_eq!(get(&c, url(&up, "/l?x=1")).await.0, 200);
    assert_eq!(slow.await.unwrap(), 200);
    let s = wait_stats(&up, |s| s.in_flight == 0).await;
    let t1 = up.now_us();
    let ids: Vec<&str> = s.arrivals.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    let [a, b, cc]: [&Arrival; 3] = [&s.arrivals[0], &s.arrivals[1], &s.arrivals[2]];
    for e in [a, b, cc] {
        assert!(t0 <= e.arrived_us && e.arrived_us <= e.finished_us && e.finished_us <= t1, "{e:?} in {t0}..{t1}");
    }
    assert!(a.finished_us - a.arrived_us >= 200_000, "the delay is inside the entry: {a:?}");
    assert!(b.finished_us - b.arrived_us >= 20_000, "{b:?}");
    assert!(a.arrived_us < b.arrived_us && b.finished_us <= cc.arrived_us, "{s:?}");
    assert!(cc.finished_us < a.finished_us, "a finished last: {s:?}");
    assert_eq!(up.arrivals(), s.arrivals);

    // The JSON form carries the log; a reset clears it.
    let (_, _, json) = get(&c, url(&up, "/__stats")).await;
    let from_json: Stats = serde_json::from_slice(&json).unwrap();
    assert_eq!(from_json.arrivals, s.arrivals);
    let post = Request::post(url(&up, "/__reset")).body(Empty::new()).unwrap();
    assert_eq!(c.request(post).await.unwrap().status(), 200);
    assert!(up.stats().arrivals.is_empty());
}

/// A request logged before a reset and finishing after it stamps nothing in the new log.
#[tokio::test]
async fn arrival_log_reset_while_a_logged_request_runs() {
    let (up, c) = start().await;
    let old = {
        let (c, u) = (c.clone(), url(&up, "/l?id=old&delay_ms=200"));
        tokio::spawn(async move { get(&c, u).await.0 })
    };
    wait_stats(&up, |s| s.in_flight == 1).await;
    up.reset_stats();
    let new = {
        let (c, u) = (c.clone(), url(&up, "/l?id=new&delay_ms=400"));
        tokio::spawn(async move { get(&c, u).await.0 })
    };
    wait_stats(&up, |s| s.in_flight == 2).await;
    assert_eq!(old.await.unwrap(), 200);
    let log = up.arrivals();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!((log[0].id.as_str(), log[0].finished_us), ("new", 0), "the old request must not stamp the new one");
    assert_eq!(new.await.unwrap(), 200);
    let s = wait_stats(&up, |s| s.in_flight == 0).await;
    assert!(s.arrivals[0].finished_us > 0, "{s:?}");
}

#[tokio::test]
async fn reset_pct_resets_that_share_of_a_path() {
    let (up, c) = start().await;
    let mut reset_at = Vec::new();
    for n in 1..=100u64 {
        if c.get(url(&up, "/rp?reset_pct=5").parse().unwrap()).await.is_err() {
            reset_at.push(n);
        }
    }
    assert_eq!(reset_at, [20, 40, 60, 80, 100], "exactly 5 of 100, evenly spread");
    let s = wait_stats(&up, |s| s.in_flight == 0).await;
    assert_eq!((s.resets, s.requests, s.responses_by_status.get(&200).copied()), (5, 100, Some(95)), "{s:?}");

    // Per path, like fail_every; 0 and 100 are the ends; over 100 is refused.
    for _ in 0..10 {
        assert_eq!(get(&c, url(&up, "/rp0?reset_pct=0")).await.0, 200);
    }
    assert!(c.get(url(&up, "/rp100?reset_pct=100").parse().unwrap()).await.is_err());
    assert_eq!(get(&c, url(&up, "/rp?reset_pct=101")).await.0, 400);
    let b = Behaviour::default().with_query("reset_pct=50").unwrap();
    assert_eq!((1..=6).filter(|&n| b.resets_nth(n)).collect::<Vec<_>>(), [2, 4, 6]);
    let b = Behaviour::default().with_query("reset_pct=30").unwrap();
    assert_eq!((1..=1000).filter(|&n| b.resets_nth(n)).count(), 300);
}

/// The log keeps only the newest entries (default [`MAX_ARRIVALS`]; a small capacity here so
/// the test is quick), and an evicted request that finishes later stamps nothing.
#[tokio::test]
async fn arrival_log_is_bounded() {
    use integration::upstream::MAX_ARRIVALS;
    let (up, c) = start().await;
    assert_eq!(MAX_ARRIVALS, 100_000);
    up.set_arrival_log_capacity(5);
    let early = {
        let (c, u) = (c.clone(), url(&up, "/b?id=early&delay_ms=300"));
        tokio::spawn(async move { get(&c, u).await.0 })
    };
    wait_stats(&up, |s| s.in_flight == 1).await;
    for i in 0..12 {
        assert_eq!(get(&c, url(&up, &format!("/b?id={i}"))).await.0, 200);
    }
    assert_eq!(early.await.unwrap(), 200);
    let s = wait_stats(&up, |s| s.in_flight == 0).await;
    let ids: Vec<&str> = s.arrivals.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["7", "8", "9", "10", "11"], "only the newest 5 are kept");
    assert!(s.arrivals.iter().all(|a| a.finished_us >= a.arrived_us && a.finished_us > 0), "{s:?}");
    // Shrinking drops the oldest at once.
    up.set_arrival_log_capacity(2);
    let ids: Vec<String> = up.arrivals().into_iter().map(|a| a.id).collect();
    assert_eq!(ids, ["10", "11"]);
}

/// With a capacity of 2, six requests of 100 ms come back in three waves (each waits its turn);
/// without one, all at once.
#[tokio::test]
async fn a_capacity_queues_the_requests_beyond_it() {
    let (up, c) = start().await;
    // Six at once; how long each took, in order.
    let wave = |c: &H1| {
        let started = std::time::Instant::now();
        let calls: Vec<_> = (0..6)
            .map(|_| {
                let (c, u) = (c.clone(), url(&up, "/cap?delay_ms=100"));
                tokio::spawn(async move {
                    get(&c, u).await;
                    started.elapsed()
                })
            })
            .collect();
        async move {
            let mut took = Vec::new();
            for call in calls {
                took.push(call.await.unwrap());
            }
            took.sort();
            took
        }
    };
    up.set_capacity(Some(2));
    let took = wave(&c).await;
    assert!(took[1] < Duration::from_millis(190), "the first two at once: {took:?}");
    assert!(took[5] >= Duration::from_millis(300), "three waves of 100 ms: {took:?}");
    up.set_capacity(None);
    let took = wave(&c).await;
    assert!(took[5] < Duration::from_millis(290), "no capacity: all at once: {took:?}");
}
