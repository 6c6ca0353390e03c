#!/usr/bin/env python3
"""`make bench`: Breakwater against plain Envoy, a no-op Wasm filter and Envoy's native
resilience, side by side in one run, on loopback.

Every variant is its own Envoy process, all started up front and all in front of the same fast
upstream (a second Envoy answering with direct_response). Rounds are interleaved (A B C …,
A B C …) so that machine drift hits every variant alike. The steady figure is the CPU time of
the Envoy under test per request (utime+stime from /proc over a fixed number of requests);
requests/s and latency come from h2load and swing far more on a small machine.

A second pass runs each variant under callgrind and counts the instructions Envoy executes per
request: timing-free, so the goals' ratios can be read exactly even on a noisy 2-core box.

This is a benchmark, not a test: it never fails because the machine is slow.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STATS_TAGS = ""  # filled from envoy/envoy.yaml so the bench runs what users run


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wasm_filter(name, path, configuration=None, disabled=False):
    """A Wasm filter in `http_filters`; `disabled`: only routes that enable it run it (a per-route
    instance, see `breakwater::per_route`)."""
    conf = ""
    if configuration is not None:
        value = json.dumps(configuration)
        conf = f"""
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {json.dumps(value)}"""
    return f"""
          - name: {name}
            disabled: {"true" if disabled else "false"}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: {name.split("-")[0]}
                failure_policy: FAIL_RELOAD
                vm_config:
                  vm_id: {name.split("-")[0]}
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: {path} }} }}{conf}"""


def enable(filter_name):
    """The route's typed_per_filter_config entry that switches a disabled filter on."""
    return f"""typed_per_filter_config:
                  {filter_name}: {{ "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig, config: {{}} }}"""


ADMISSION_CONTROL = """
          - name: envoy.filters.http.admission_control
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.admission_control.v3.AdmissionControl
              enabled: { default_value: true, runtime_key: ac.enabled }
              sampling_window: 10s
              sr_threshold: { default_value: { value: 95.0 }, runtime_key: ac.sr_threshold }
              aggression: { default_value: 1.0, runtime_key: ac.aggression }
              success_criteria:
                http_criteria:
                  http_success_status: [{ start: 100, end: 500 }]"""

NATIVE_CLUSTER_EXTRAS = """
    circuit_breakers:
      thresholds:
      - priority: DEFAULT
        max_connections: 1024
        max_pending_requests: 1024
        max_requests: 1024
        max_retries: 3
        retry_budget: { budget_percent: { value: 20.0 }, min_retry_concurrency: 3 }
    outlier_detection:
      consecutive_5xx: 5
      interval: 10s
      base_ejection_time: 30s
      max_ejection_percent: 10"""


def envoy_yaml(port, admin_port, upstream_port, filters="", route=None, cluster_extras="", dead_port=None,
               per_route="", vhost_extras="", pre_routes=""):
    route = route or "route: { cluster: upstream, timeout: 5s }"
    if per_route:
        route += "\n                " + per_route
    dead = ""
    if dead_port:
        dead = f"""
  - name: dead
    type: STATIC
    connect_timeout: 0.25s
    load_assignment:
      cluster_name: dead
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {dead_port} }} }} }} }}] }}]"""
    return f"""
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
{STATS_TAGS}
static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: bench
              domains: ["*"]{vhost_extras}
              routes:{pre_routes}
              - name: bench
                match: {{ prefix: / }}
                {route}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }} }} }} }}] }}]{cluster_extras}{dead}
"""


def upstream_yaml(port, admin_port):
    """The fast upstream every variant talks to: an Envoy that answers 200 "ok" by itself."""
    return envoy_yaml(port, admin_port, port, route="direct_response: { status: 200, body: { inline_string: ok } }",
                      pre_routes=FAIL_ROUTE)


# The upstream answers 503 under /fail: what trips a breaker after a good answer was cached.
FAIL_ROUTE = """
              - match: { prefix: /fail }
                direct_response: { status: 503 }"""


# The realistic policy of the issue: a breaker with consecutive failures, a failure-rate window
# and slow-call detection; a bulkhead far from full; a retry budget on the route's own retry
# policy (nothing fails, so nothing is retried).
BREAKER = {
    "consecutive_failures": 5,
    "failure_rate": {"threshold": 50, "minimum_requests": 20, "window": "10s"},
    "slow_call": {"duration": "500ms", "threshold": 80},
    "open_for": "30s",
}
BULKHEAD = {"max_concurrent": 100, "queue": {"max_size": 50, "timeout": "2s"}}
RETRY = {"max_retries": 2, "budget": {"ratio": 0.2, "min_per_second": 10, "ttl": "10s"}}
# The route's own retry policy that the budget governs, and the attempt count Breakwater reads.
ROUTE_RETRY = "retry_policy: { retry_on: 5xx, num_retries: 2 }"
ATTEMPTS = "\n              include_attempt_count_in_response: true"


# The fallbacks (issue 13), on the breaker policy: nothing tripping, what each costs the healthy
# path; answering the fast-fail, what a refusal it answers costs.
FALLBACKS = {
    "static": {"static": {"status": 200, "headers": {"content-type": "application/json"},
                          "body": '{"items":[],"degraded":true}'}},
    "cache": {"cache": {"max_entries": 1000, "max_body": "64KiB", "ttl": "1h"}},
    "cluster": {"cluster": "fallback"},
}
# The route a fallback cluster needs, ahead of the others (README: Fallbacks).
FALLBACK_ROUTE = """
              - match: { prefix: /, filter_state: [{ key: wasm.breakwater_fallback, string_match: { exact: fallback } }] }
                route: { cluster: fallback, timeout: 5s }"""
FALLBACK_CLUSTER = """
  - name: fallback
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: fallback
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}]"""
# Requests sent before the warm-up: the cache-answered fast-fail first stores a good answer to
# the measured request, then trips its breaker.
PRIME = {"fast_fail_cache": ["/", "/fail"]}

# The adaptive parts, each on top of the breaker, nothing tripping: the adaptive timeout
# (one request header set; the breaker reads the response headers already); a bulkhead with the
# configuration example's priority classes, then the same classes with shedding thresholds (no
# request carries the header: all are standard, and one connection never reaches 90%); and an
# adaptive limit that starts where the fixed bulkhead is (100), far from full, so both lease.
TIMEOUT = {"adaptive": {"percentile": 95, "multiplier": 1.5, "margin": "50ms", "min": "100ms", "max": "5s",
                        "minimum_requests": 50}}
CLASSES = {"header": "x-priority", "default": "standard",
           "classes": {"critical": {"reserved": 20}, "background": {"max": 10}}}
SHED = {"header": "x-priority", "default": "standard",
        "classes": {"critical": {"reserved": 20}, "standard": {"shed_at": 0.9}, "background": {"max": 10, "shed_at": 0.5}}}
ADAPTIVE = {"adaptive": {"min": 100, "max": 200}, "queue": BULKHEAD["queue"]}


def policy(stack=False, fast_fail=False, fallback=None, timeout=False, bulkhead=None):
    if fast_fail:
        p = {"circuit_breaker": {"consecutive_failures": 1, "open_for": "1h"}}
    else:
        p = {"circuit_breaker": BREAKER}
    if stack:
        p.update(bulkhead=BULKHEAD, retry=RETRY)
    if fallback:
        p["fallback"] = FALLBACKS[fallback]
    if timeout:
        p["timeout"] = TIMEOUT
    if bulkhead:
        p["bulkhead"] = bulkhead
    return p


def per_route_config(**kw):
    """One per-route instance's configuration: its one policy, no route lookup."""
    return {"policies": {"bench": policy(**kw)}, "policy": "bench"}


def rules_config(rules=1, **kw):
    """One filter for all routes: rules for other routes come first, the request's own last."""
    routes = [{"match": {"route_name": f"other-{i}"}, "policy": "bench"} for i in range(rules - 1)]
    routes.append({"match": {"route_name": "bench"}, "policy": "bench"})
    return {"policies": {"bench": policy(**kw)}, "routes": routes}


class Envoy:
    def __init__(self, envoy_bin, name, yaml, workdir, concurrency, cpu="0"):
        self.name = name
        self.port = None
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "envoy.yaml").write_text(yaml)
        self.log = open(self.dir / "envoy.log", "w")
        # Envoys under test share CPU 0; the load generator and the upstream get CPU 1, so the
        # figures measure Envoy's work rather than how the scheduler interleaved three programs.
        self.proc = subprocess.Popen(
            pin(cpu) + [envoy_bin, "-c", str(self.dir / "envoy.yaml"), "--concurrency", str(concurrency),
             "--use-dynamic-base-id", "--disable-hot-restart", "-l", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, admin_port, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: Envoy exited: {(self.dir / 'envoy.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        self.admin_port = admin_port
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: Envoy not ready after {timeout}s")

    def cpu_seconds(self):
        """utime+stime of the whole process. schedstat's nanoseconds, summed over the threads,
        are finer than /proc/PID/stat's clock ticks; Envoy's threads live as long as it does."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total / 1e9

    def stat(self, name):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats?filter=^{re.escape(name)}$") as r:
            m = re.search(r": (\d+)", r.read().decode())
            return int(m.group(1)) if m else None

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def pin(cpu):
    """taskset prefix when the machine has a second CPU to spare."""
    if cpu is None or (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", cpu]


def h2load(port, requests, connections, logfile):
    out = subprocess.run(
        pin("1") + ["h2load", "--h1", "-n", str(requests), "-c", str(connections), "-t", "1",
         f"--log-file={logfile}", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", out).group(1))
    lat = sorted(int(line.split("\t")[2]) for line in open(logfile) if line.strip())
    statuses = {}
    for line in open(logfile):
        if line.strip():
            s = line.split("\t")[1]
            statuses[s] = statuses.get(s, 0) + 1
    return {"rps": rps, "done": done, "p50_us": pct(lat, 50), "p99_us": pct(lat, 99), "statuses": statuses}


def pct(sorted_values, p):
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def measure(envoy, requests, connections, tmp):
    before = envoy.cpu_seconds()
    r = h2load(envoy.port, requests, connections, Path(tmp) / f"{envoy.name}.h2load.log")
    after = envoy.cpu_seconds()
    r["cpu_us_per_req"] = (after - before) * 1e6 / max(r["done"], 1)
    return r


def run_group(envoys, rounds, requests, connections, tmp, label):
    """Interleaved rounds over a group of running Envoys; returns medians per variant."""
    for e in envoys:  # warm-up: JIT, connection pools, and the fast-fail trip
        h2load(e.port, max(requests // 10, 500), connections, Path(tmp) / "warmup.log")
    samples = {e.name: [] for e in envoys}
    for i in range(rounds):
        for e in envoys:
            samples[e.name].append(measure(e, requests, connections, tmp))
        print(f"  {label}: round {i + 1}/{rounds} done", file=sys.stderr)
    result = {}
    for name, runs in samples.items():
        result[name] = {
            k: statistics.median(r[k] for r in runs) for k in ("cpu_us_per_req", "rps", "p50_us", "p99_us")
        }
        result[name]["cpu_us_per_req_all"] = [round(r["cpu_us_per_req"], 2) for r in runs]
        result[name]["statuses"] = runs[-1]["statuses"]
    return result


def start(envoy_bin, name, make_yaml, tmp, concurrency):
    for attempt in range(3):
        port, admin = free_port(), free_port()
        e = Envoy(envoy_bin, name, make_yaml(port, admin), tmp, concurrency)
        e.port = port
        try:
            e.wait_ready(admin)
        except RuntimeError as err:
            e.stop()
            # Another process took a port between free_port() and Envoy's bind: pick again.
            if "Address already in use" in str(err) and attempt < 2:
                continue
            raise
        prime(name.rsplit("-w", 1)[0], port)
        return e


def prime(variant, port):
    """Sends the variant's priming requests (see PRIME), whatever they answer."""
    for path in PRIME.get(variant, []):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30).read()
        except OSError:
            pass


def main():
    global STATS_TAGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envoy", default=os.environ.get("ENVOY_BIN", "envoy"))
    ap.add_argument("--breakwater", default=str(ROOT / "target/wasm32-wasip1/release/breakwater.wasm"))
    ap.add_argument("--noop", default=str(ROOT / "target/wasm32-wasip1/release/breakwater_bench_noop.wasm"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--callgrind-requests", type=int, default=2000,
                    help="requests per variant counted under callgrind (0: skip that pass)")
    ap.add_argument("--only-callgrind", action="store_true",
                    help="skip the CPU-time rounds and the idle pass (a quick look while developing; prints, writes nothing)")
    ap.add_argument("--keep-callgrind", metavar="DIR",
                    help="with --only-callgrind: copy each variant's callgrind dumps to DIR/<variant>/ "
                         "(part 1: the measured requests, part 2: as long idle), for callgrind_annotate")
    ap.add_argument("--variants", default="",
                    help="with --only-callgrind: only these variants (comma-separated names, e.g. breaker_route,cache_route)")
    args = ap.parse_args()
    if not shutil.which("h2load"):
        sys.exit("h2load not found: apt-get install nghttp2-client")
    text = (ROOT / "envoy/envoy.yaml").read_text()
    STATS_TAGS = text[text.index("stats_config:"):text.index("static_resources:")]

    tmp = tempfile.mkdtemp(prefix="breakwater-bench-")
    running = []
    results = {"machine": machine(), "envoy": envoy_version(args.envoy), "params": vars(args)}
    try:
        up_port, up_admin = free_port(), free_port()
        upstream = Envoy(args.envoy, "upstream", upstream_yaml(up_port, up_admin), tmp, 1, cpu="1")
        running.append(upstream)
        upstream.wait_ready(up_admin)
        dead_port = free_port()  # nothing listens here: the fast-fail route's cluster

        variants = make_variants(args, up_port, dead_port)
        if args.only_callgrind:
            chosen = [v for v in args.variants.split(",") if v]
            for name, make_yaml in variants.items():
                if chosen and name not in chosen:
                    continue
                per_req, window, idle = instructions_per_request(args.envoy, name, make_yaml, tmp, args.callgrind_requests,
                                                                 keep=args.keep_callgrind)
                print(f"{name}: {per_req:,.0f} instructions/request ({window:.1f}s; idle work {idle:,.0f}/request)")
            return
        for workers in (1, 2):
            group = [start(args.envoy, f"{name}-w{workers}", y, tmp, workers) for name, y in variants.items()]
            running += group
            res = run_group(group, args.rounds, args.requests, args.connections, tmp, f"{workers} worker(s)")
            results[f"workers_{workers}"] = {k.rsplit("-w", 1)[0]: v for k, v in res.items()}
            if workers == 1:
                results["memory_allocated"] = {
                    e.name.rsplit("-w", 1)[0]: e.stat("server.memory_allocated") for e in group}
            for e in group:
                e.stop()
                running.remove(e)

        group = [start(args.envoy, f"rules-{n}", y, tmp, 1) for n, y in rule_variants(args, up_port).items()]
        running += group
        results["rules"] = run_group(group, args.rounds, args.requests, args.connections, tmp, "route rules")
        for e in group:
            e.stop()
            running.remove(e)
        results["wasm_bytes"] = {"breakwater": os.path.getsize(args.breakwater), "noop": os.path.getsize(args.noop)}

        if args.callgrind_requests and shutil.which("valgrind"):
            every = dict(variants)
            every.update({f"rules-{n}": y for n, y in rule_variants(args, up_port).items()})
            results["instructions"] = {}
            results["idle_instructions"] = {}
            windows = []
            for name, make_yaml in every.items():
                per_req, window, idle = instructions_per_request(args.envoy, name, make_yaml, tmp, args.callgrind_requests)
                results["instructions"][name] = per_req
                results["idle_instructions"][name] = idle
                windows.append(window)
                print(f"  callgrind: {name} {per_req:,.0f} instructions/request ({window:.1f}s)", file=sys.stderr)
            results["callgrind_window"] = {
                "requests": args.callgrind_requests, "median_seconds": statistics.median(windows),
                "median_ticks": statistics.median(windows) / 0.05, "tick_ms": 50}

        results["idle_cpu_percent"] = {}
        for n in (1, 5000):
            yaml = lambda p, a, n=n: envoy_yaml(p, a, up_port, wasm_filter("breakwater", args.breakwater, many_policies(n)))
            results["idle_cpu_percent"][f"breakwater-{n}-policies"] = idle_cpu(args.envoy, f"idle-{n}", yaml, tmp)
        results["idle_cpu_percent"]["plain"] = idle_cpu(args.envoy, "idle-plain", lambda p, a: envoy_yaml(p, a, up_port), tmp)
        print(f"  idle: {results['idle_cpu_percent']}", file=sys.stderr)
    finally:
        for e in running:
            e.stop()
        # Whatever ended the run (--only-callgrind's early return, an error, Ctrl-C).
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    md = report(results)
    (out / "bench.md").write_text(md)
    (out / "bench.svg").write_text(chart(results))
    print(md)


def make_variants(args, up_port, dead_port):
    wasm = args.breakwater
    route_instance = lambda **kw: wasm_filter("breakwater-bench", wasm, per_route_config(**kw), disabled=True)
    retry_route = f"route: {{ cluster: upstream, timeout: 5s, {ROUTE_RETRY} }}"
    variants = {
        "plain": lambda p, a: envoy_yaml(p, a, up_port),
        "noop": lambda p, a: envoy_yaml(p, a, up_port, wasm_filter("noop", args.noop)),
        "breaker_route": lambda p, a: envoy_yaml(p, a, up_port, route_instance(), per_route=enable("breakwater-bench")),
        "stack_route": lambda p, a: envoy_yaml(
            p, a, up_port, route_instance(stack=True), route=retry_route, per_route=enable("breakwater-bench"),
            vhost_extras=ATTEMPTS),
        "timeout_route": lambda p, a: envoy_yaml(
            p, a, up_port, route_instance(timeout=True), per_route=enable("breakwater-bench")),
        "bulkhead_route": lambda p, a: envoy_yaml(
            p, a, up_port, route_instance(bulkhead=BULKHEAD), per_route=enable("breakwater-bench")),
        "adaptive_route": lambda p, a: envoy_yaml(
            p, a, up_port, route_instance(bulkhead=ADAPTIVE), per_route=enable("breakwater-bench")),
        "classes_route": lambda p, a: envoy_yaml(
            p, a, up_port, route_instance(bulkhead=dict(BULKHEAD, priority=CLASSES)), per_route=enable("breakwater-bench")),
        "shed_route": lambda p, a: envoy_yaml(
            p, a, up_port, route_instance(bulkhead=dict(BULKHEAD, priority=SHED)), per_route=enable("breakwater-bench")),
        "stack_rules": lambda p, a: envoy_yaml(
            p, a, up_port, wasm_filter("breakwater", wasm, rules_config(stack=True)), route=retry_route,
            vhost_extras=ATTEMPTS),
        "native": lambda p, a: envoy_yaml(p, a, up_port, ADMISSION_CONTROL, cluster_extras=NATIVE_CLUSTER_EXTRAS),
        "direct_response": lambda p, a: envoy_yaml(
            p, a, up_port, route="direct_response: { status: 503, body: { inline_string: unavailable } }"),
        "noop_direct_response": lambda p, a: envoy_yaml(
            p, a, up_port, wasm_filter("noop", args.noop),
            route="direct_response: { status: 503, body: { inline_string: unavailable } }"),
        "fast_fail": lambda p, a: envoy_yaml(
            p, a, up_port, route_instance(fast_fail=True), route="route: { cluster: dead, timeout: 5s }",
            per_route=enable("breakwater-bench"), dead_port=dead_port),
    }
    fallback_cluster = FALLBACK_CLUSTER.format(port=up_port)
    for kind in FALLBACKS:
        extras = {"cluster_extras": fallback_cluster, "pre_routes": FALLBACK_ROUTE} if kind == "cluster" else {}
        variants[f"{kind}_route"] = lambda p, a, kind=kind, extras=extras: envoy_yaml(
            p, a, up_port, route_instance(fallback=kind), per_route=enable("breakwater-bench"), **extras)
        # The fast-fail answered by the fallback: the cache's after a good answer was stored (so
        # its route reaches the upstream, whose /fail trips the breaker).
        route = "route: { cluster: upstream, timeout: 5s }" if kind == "cache" else "route: { cluster: dead, timeout: 5s }"
        variants[f"fast_fail_{kind}"] = lambda p, a, kind=kind, extras=extras, route=route: envoy_yaml(
            p, a, up_port, route_instance(fast_fail=True, fallback=kind), route=route,
            per_route=enable("breakwater-bench"), dead_port=dead_port, **extras)
    return variants


def rule_variants(args, up_port):
    out = {}
    for n in (1, 100, 10000):
        f = wasm_filter("breakwater", args.breakwater, rules_config(rules=n))
        out[n] = lambda p, a, f=f: envoy_yaml(p, a, up_port, f)
    return out


def instructions_per_request(envoy_bin, name, make_yaml, tmp, requests, keep=None):
    """Instructions Envoy executes per request, counted by callgrind (1 worker, 1 connection):
    the same figure run after run, whatever else the machine does. Only the measured requests
    are counted; start-up and warm-up are not."""
    port, admin = free_port(), free_port()
    d = Path(tempfile.mkdtemp(dir=tmp, prefix=f"cg-{name}-"))
    (d / "envoy.yaml").write_text(make_yaml(port, admin))
    out = d / "callgrind.out"
    proc = subprocess.Popen(
        pin("0") + ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--smc-check=all-non-file",
                    f"--callgrind-out-file={out}", envoy_bin, "-c", str(d / "envoy.yaml"), "--concurrency", "1",
                    "--use-dynamic-base-id", "--disable-hot-restart", "-l", "error"],
        stdout=open(d / "log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    e = Envoy.__new__(Envoy)
    e.proc, e.name, e.dir, e.log = proc, name, d, open(os.devnull, "w")
    try:
        e.wait_ready(admin, timeout=600)
        prime(name, port)
        load = pin("1") + ["h2load", "--h1", "-c", "1", f"http://127.0.0.1:{port}/"]
        subprocess.run(load[:-1] + ["-n", "300", load[-1]], capture_output=True, check=True)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], capture_output=True, check=True)
        started = time.time()
        subprocess.run(load[:-1] + ["-n", str(requests), load[-1]], capture_output=True, check=True)
        window = time.time() - started
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
        # As long again with no requests: the work that runs whatever the traffic (the plugin's
        # ticks, Envoy's own timers), to show how much of the count above it is.
        time.sleep(window)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
    finally:
        e.stop()
    dumps = []
    for f in d.glob("callgrind.out*"):
        text = f.read_text(errors="ignore")
        if "Trigger: dump" in text:
            part = int(re.search(r"^part: (\d+)", text, re.M).group(1))
            dumps.append((part, int(re.search(r"^summary: (\d+)", text, re.M).group(1))))
    dumps.sort()
    if keep:
        kept = Path(keep) / name
        kept.mkdir(parents=True, exist_ok=True)
        for f in d.glob("callgrind.out*"):
            shutil.copy(f, kept / f.name)
    if len(dumps) < 2:
        return float("nan"), window, float("nan")
    return dumps[0][1] / requests, window, dumps[1][1] / requests


def idle_cpu(envoy_bin, name, make_yaml, tmp, seconds=10):
    """Percent of one core an idle Envoy (2 workers, no traffic) uses, over `seconds` after it
    settled: what the plugin's ticks cost when nothing happens."""
    e = start(envoy_bin, name, make_yaml, tmp, 2)
    try:
        time.sleep(3)
        before = e.cpu_seconds()
        time.sleep(seconds)
        return (e.cpu_seconds() - before) / seconds * 100
    finally:
        e.stop()


def many_policies(n):
    return {"policies": {f"p{i}": policy(stack=True) for i in range(n)},
            "routes": [{"match": {"route_name": f"r{i}"}, "policy": f"p{i}"} for i in range(n)]}


def machine():
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {cpu}"


def envoy_version(envoy_bin):
    out = subprocess.run([envoy_bin, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version: \S+/([\d.]+)/", out)
    return m.group(1) if m else out.strip()


LABELS = {
    "plain": "(1) plain Envoy",
    "noop": "(2) + no-op Wasm filter",
    "breaker_route": "(3) + Breakwater breaker, per-route instance",
    "stack_route": "(3') + breaker, bulkhead, retry budget: per-route instance",
    "timeout_route": "(3a) breaker + adaptive timeout",
    "bulkhead_route": "(3b) breaker + bulkhead (100, a queue)",
    "adaptive_route": "(3c) breaker + adaptive limit (100-200, a queue)",
    "classes_route": "(3d) breaker + bulkhead with priority classes",
    "shed_route": "(3e) breaker + priority classes that shed",
    "stack_rules": "(3'') + the same stack: one filter with route rules",
    "native": "(4) + Envoy native: circuit_breakers, retry_budget, outlier_detection, admission_control",
    "fast_fail": "(5) Breakwater fast-fail (circuit open), per-route instance",
    "direct_response": "(5') Envoy direct_response",
    "noop_direct_response": "(5'') no-op Wasm filter + direct_response: the floor for (5)",
    "static_route": "(6) (3) + a static fallback, nothing tripping",
    "cache_route": "(6') (3) + a fallback cache, nothing tripping",
    "cluster_route": "(6'') (3) + a fallback cluster (and its route), nothing tripping",
    "fast_fail_static": "(7) (5) answered by the static fallback",
    "fast_fail_cache": "(7') (5) answered from the fallback cache",
    "fast_fail_cluster": "(7'') (5) sent to the fallback cluster",
}


def report(r):
    lines = [
        "# Breakwater benchmark",
        "",
        f"Envoy {r['envoy']} on {r['machine']}; `make bench` "
        f"({r['params']['rounds']} interleaved rounds of {r['params']['requests']} requests, "
        f"h2load --h1 -c {r['params']['connections']}); medians.",
        "CPU µs/req is the Envoy process's utime+stime per request.",
        "",
    ]
    for w in (1, 2):
        g = r[f"workers_{w}"]
        plain, noop = g["plain"]["cpu_us_per_req"], g["noop"]["cpu_us_per_req"]
        lines += [f"## {w} worker{'s' if w > 1 else ''}", "",
                  "| variant | CPU µs/req | × plain | × no-op | req/s | p50 µs | p99 µs |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for k, label in LABELS.items():
            v = g[k]
            lines.append(f"| {label} | {v['cpu_us_per_req']:.1f} | {v['cpu_us_per_req'] / plain:.2f} | "
                         f"{v['cpu_us_per_req'] / noop:.2f} | {v['rps']:.0f} | {v['p50_us']:.0f} | {v['p99_us']:.0f} |")
        ff = g["fast_fail"]["cpu_us_per_req"] / g["direct_response"]["cpu_us_per_req"]
        lines += ["", f"Fast-fail ÷ direct_response: **{ff:.2f}**; "
                  f"whole stack ÷ no-op: per-route **{g['stack_route']['cpu_us_per_req'] / noop:.2f}**, "
                  f"route rules **{g['stack_rules']['cpu_us_per_req'] / noop:.2f}**; "
                  f"breaker alone ÷ no-op: **{g['breaker_route']['cpu_us_per_req'] / noop:.2f}**", ""]
    rules = r["rules"]
    base = rules["rules-1"]["cpu_us_per_req"]
    lines += ["## Route rules (1 worker)", "", "| rules | CPU µs/req | × 1 rule |", "|---:|---:|---:|"]
    for n in (1, 100, 10000):
        v = rules[f"rules-{n}"]["cpu_us_per_req"]
        lines.append(f"| {n} | {v:.1f} | {v / base:.2f} |")
    ins = r.get("instructions")
    if ins:
        plain, noop = ins["plain"], ins["noop"]
        lines += ["", "## Instructions per request (callgrind, 1 worker, 1 connection)", "",
                  "Counted, not timed: the same figures run after run. The goals' ratios, exactly:", "",
                  "| variant | instructions/req | × plain | × no-op | idle work in the window, per request |",
                  "|---|---:|---:|---:|---:|"]
        idle_ins = r.get("idle_instructions", {})
        for k, label in LABELS.items():
            idle = idle_ins.get(k, float("nan"))
            lines.append(f"| {label} | {ins[k]:,.0f} | {ins[k] / plain:.3f} | {ins[k] / noop:.3f} | {idle:,.0f} |")
        for n in (1, 100, 10000):
            lines.append(f"| Breakwater, {n} route rules | {ins[f'rules-{n}']:,.0f} | "
                         f"{ins[f'rules-{n}'] / plain:.3f} | {ins[f'rules-{n}'] / noop:.3f} |")
        lines += ["", "The goals, read from these counts:", "",
                  "| goal | result |", "|---|---:|",
                  f"| whole stack, per-route instance ≤ 1.10 × no-op | **{ins['stack_route'] / noop:.3f}** |",
                  f"| breaker alone, per-route instance ≤ 1.08 × no-op | **{ins['breaker_route'] / noop:.3f}** |",
                  f"| whole stack, one filter with route rules ≤ 1.16 × no-op | **{ins['stack_rules'] / noop:.3f}** |",
                  f"| fast-fail ≤ 1.35 × direct_response | **{ins['fast_fail'] / ins['direct_response']:.3f}** |",
                  f"| 10 000 route rules ≤ 1.02 × 1 rule | **{ins['rules-10000'] / ins['rules-1']:.3f}** |",
                  f"| (for reference) whole stack ÷ Envoy native | {ins['stack_route'] / ins['native']:.3f} |"]
        cg = r.get("callgrind_window")
        if cg:
            lines += ["", f"Each callgrind count covers {cg['requests']} requests over the variant's whole measured "
                      f"window (median {cg['median_seconds']:.1f} s, so {cg['median_ticks']:.0f} ticks of "
                      f"{cg['tick_ms']} ms): the tick's work is in the figures, at a request rate far below "
                      "production's, so its share per request is over- rather than under-counted. The last column "
                      "is what the same Envoy executed in as long again with no request at all (the plugin's ticks, "
                      "Envoy's own timers), divided by the same number of requests: how much of the figure is work "
                      "that does not grow with traffic. Nothing is subtracted from the figures or the goals."]
    idle = r.get("idle_cpu_percent")
    if idle:
        lines += ["", "## Idle cost (2 workers, no traffic, 10 s)", "",
                  "| Envoy | % of one core |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in idle.items()]
    mem = r["memory_allocated"]
    lines += ["", "## Size and memory", "",
              f"- `.wasm`: Breakwater {r['wasm_bytes']['breakwater']:,} bytes; no-op {r['wasm_bytes']['noop']:,} bytes",
              "- `server.memory_allocated` after warm-up, 1 worker: "
              + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items() if v is not None), ""]
    return "\n".join(lines)


def chart(r):
    """A bar chart of CPU µs/request, 1 and 2 workers, as a standalone SVG."""
    keys = list(LABELS)
    width, bar_h, gap, left = 760, 14, 10, 330
    groups = [(w, r[f"workers_{w}"]) for w in (1, 2)]
    top = max(g[k]["cpu_us_per_req"] for _, g in groups for k in keys)
    scale = (width - left - 80) / top
    height = 50 + len(keys) * (2 * bar_h + gap)
    colors = {1: "#2b6cb0", 2: "#90cdf4"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<text x="10" y="20" font-size="14">Envoy CPU time per request (µs, median) — Envoy {r["envoy"]}</text>',
           f'<rect x="{left}" y="28" width="10" height="10" fill="{colors[1]}"/><text x="{left + 14}" y="37">1 worker</text>',
           f'<rect x="{left + 90}" y="28" width="10" height="10" fill="{colors[2]}"/><text x="{left + 104}" y="37">2 workers</text>']
    y = 50
    for k in keys:
        out.append(f'<text x="{left - 8}" y="{y + bar_h + 4}" text-anchor="end">{LABELS[k][:48]}</text>')
        for w, g in groups:
            v = g[k]["cpu_us_per_req"]
            out.append(f'<rect x="{left}" y="{y}" width="{v * scale:.1f}" height="{bar_h - 2}" fill="{colors[w]}"/>')
            out.append(f'<text x="{left + v * scale + 4:.1f}" y="{y + bar_h - 3}">{v:.1f}</text>')
            y += bar_h
        y += gap
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
