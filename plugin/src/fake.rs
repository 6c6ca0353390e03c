//! A fake host for fast native tests of the request logic. Several `FakeHost`s made with
//! [`FakeHost::worker_of`] share shared data and metrics, like Envoy's workers do.

use crate::host::{Host, MetricKind, SharedError};
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use hashbrown::HashMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The context it was sent on (see `enter`).
    pub context: u32,
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// Host calls that return data: each costs a VM re-entry in Envoy (~10–12k instructions).
pub const DATA_CALLS: [&str; 7] =
    ["property", "header", "request_headers", "response_headers", "response_body", "trailer", "shared_get"];

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
pub struct Process {
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    metrics: RefCell<Vec<(String, i64)>>,
    /// Metric ids by name (Envoy's define_metric returns the same id for the same name).
    metric_ids: RefCell<HashMap<String, u32>>,
    /// Fail this many CAS writes with a mismatch, to exercise retry loops.
    pub cas_conflicts: Cell<u32>,
    /// Shared queues by token; a missing token is a queue that is gone.
    pub queues: RefCell<HashMap<u32, alloc::collections::VecDeque<Vec<u8>>>>,
}

#[derive(Default)]
pub struct FakeHost {
    pub process: Rc<Process>,
    pub now: Cell<u64>,
    /// Attributes by dotted path, e.g. "response.code".
    pub props: RefCell<HashMap<String, Vec<u8>>>,
    pub headers: RefCell<HashMap<String, Vec<u8>>>,
    /// In order, as Envoy keeps them.
    pub response_headers: RefCell<Vec<(String, Vec<u8>)>>,
    /// When set, what `response_headers()` returns instead of serializing the above: a map as
    /// malformed as a test likes.
    pub raw_response_headers: RefCell<Option<Vec<u8>>>,
    pub response_trailers: RefCell<HashMap<String, Vec<u8>>>,
    /// The response body chunk passing now (`response_body` returns it).
    pub body_chunk: RefCell<Vec<u8>>,
    /// Filter state the plugin set on the stream (`set_property`), and route cache clears.
    pub filter_state: RefCell<HashMap<String, Vec<u8>>>,
    pub route_cleared: Cell<u32>,
    pub replies: RefCell<Vec<Reply>>,
    /// Host calls made, by kind ("property", "header", "shared_get", …): what a request costs.
    pub calls: RefCell<HashMap<&'static str, u32>>,
    /// The context host calls act on (`enter`).
    pub context: Cell<u32>,
    /// Contexts resumed, in order.
    pub resumed: RefCell<Vec<u32>>,
    /// The tick's pace as last set (`pace_tick`): true, every `sync_interval`.
    pub tick_fine: Cell<bool>,
}

impl FakeHost {
    pub fn new() -> Self {
        FakeHost::default()
    }
    /// Another worker of the same process.
    pub fn worker_of(other: &FakeHost) -> Self {
        FakeHost { process: other.process.clone(), ..FakeHost::default() }
    }
    pub fn set_prop(&self, path: &str, value: &[u8]) {
        self.props.borrow_mut().insert(path.to_string(), value.to_vec());
    }
    pub fn set_prop_u64(&self, path: &str, value: u64) {
        self.set_prop(path, &value.to_le_bytes());
    }
    pub fn set_header(&self, name: &str, value: impl AsRef<[u8]>) {
        self.headers.borrow_mut().insert(name.to_string(), value.as_ref().to_vec());
    }
    /// A request header as text, for assertions.
    pub fn header_text(&self, name: &str) -> Option<String> {
        self.headers.borrow().get(name).map(|v| String::from_utf8_lossy(v).into_owned())
    }
    pub fn set_response_header(&self, name: &str, value: impl AsRef<[u8]>) {
        let mut h = self.response_headers.borrow_mut();
        h.retain(|(n, _)| n != name);
        h.push((name.to_string(), value.as_ref().to_vec()));
    }
    pub fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.response_headers.borrow().iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }
    pub fn set_response_trailer(&self, name: &str, value: impl AsRef<[u8]>) {
        self.response_trailers.borrow_mut().insert(name.to_string(), value.as_ref().to_vec());
    }
    /// Forget the last stream's attributes and headers, as a new stream would.
    pub fn new_stream(&self) {
        self.props.borrow_mut().clear();
        self.headers.borrow_mut().clear();
        self.response_headers.borrow_mut().clear();
        *self.raw_response_headers.borrow_mut() = None;
        self.response_trailers.borrow_mut().clear();
        self.body_chunk.borrow_mut().clear();
        self.filter_state.borrow_mut().clear();
    }
    fn count(&self, kind: &'static str) {
        *self.calls.borrow_mut().entry(kind).or_default() += 1;
    }
    /// The host calls counted since the last call of this, by kind.
    pub fn take_calls(&self) -> HashMap<&'static str, u32> {
        core::mem::take(&mut *self.calls.borrow_mut())
    }
    /// Of `calls`, those that return data (see [`DATA_CALLS`]).
    pub fn data_calls(calls: &HashMap<&'static str, u32>) -> u32 {
        DATA_CALLS.iter().map(|k| calls.get(k).copied().unwrap_or(0)).sum()
    }
    /// A stat by its name without the `breakwater_` prefix, e.g.
    /// `requests_total.policy.checkout.outcome.failure`.
    pub fn metric(&self, name: &str) -> i64 {
        let full = alloc::format!("breakwater_{name}");
        self.process.metrics.borrow().iter().find(|(n, _)| *n == full).map_or(0, |(_, v)| *v)
    }
    /// Whether a stat of that name was defined.
    pub fn has_metric(&self, name: &str) -> bool {
        let full = alloc::format!("breakwater_{name}");
        self.process.metrics.borrow().iter().any(|(n, _)| *n == full)
    }
    /// The shared-data keys of the process.
    pub fn process_shared_keys(&self) -> Vec<String> {
        self.process.shared.borrow().keys().cloned().collect()
    }
    pub fn last_reply(&self) -> Option<Reply> {
        self.replies.borrow().last().cloned()
    }
}

impl Host for FakeHost {
    fn now_ns(&self) -> u64 {
        self.count("clock");
        self.now.get()
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.count("property");
        self.props.borrow().get(&path.join(".")).cloned()
    }
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.count("header");
        self.headers.borrow().get(name).cloned()
    }
    fn set_request_header(&self, name: &str, value: &[u8]) {
        self.count("set_header");
        self.headers.borrow_mut().insert(name.to_string(), value.to_vec());
    }
    fn response_headers(&self) -> Option<Vec<u8>> {
        self.count("response_headers");
        if let Some(raw) = self.raw_response_headers.borrow().clone() {
            return Some(raw);
        }
        let h = self.response_headers.borrow();
        let pairs: Vec<(&str, &[u8])> = h.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        Some(crate::headers::serialize(&pairs))
    }
    fn remove_response_header(&self, name: &str) {
        self.count("remove_header");
        self.response_headers.borrow_mut().retain(|(n, _)| n != name);
    }
    fn set_response_header(&self, name: &str, value: &[u8]) {
        self.count("set_response_header");
        self.set_response_header(name, value);
    }
    fn request_headers(&self) -> Option<Vec<u8>> {
        self.count("request_headers");
        let h = self.headers.borrow();
        let pairs: Vec<(&str, &[u8])> = h.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        Some(crate::headers::serialize(&pairs))
    }
    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        self.count("response_body");
        let chunk = self.body_chunk.borrow();
        Some(chunk.get(..size.min(chunk.len())).unwrap_or_default().to_vec())
    }
    fn set_property(&self, name: &str, value: &[u8]) -> bool {
        self.count("set_property");
        self.filter_state.borrow_mut().insert(name.to_string(), value.to_vec());
        true
    }
    fn clear_route_cache(&self) -> bool {
        self.count("clear_route_cache");
        self.route_cleared.set(self.route_cleared.get() + 1);
        true
    }
    fn response_trailer(&self, name: &str) -> Option<Vec<u8>> {
        self.count("trailer");
        self.response_trailers.borrow().get(name).cloned()
    }
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.count("shared_get");
        self.process.shared.borrow().get(key).cloned()
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SharedError> {
        self.count("shared_set");
        let conflicts = self.process.cas_conflicts.get();
        if conflicts > 0 {
            self.process.cas_conflicts.set(conflicts - 1);
            return Err(SharedError::CasMismatch);
        }
        let mut map = self.process.shared.borrow_mut();
        let current = map.get(key).map_or(0, |(_, c)| *c);
        if cas != 0 && cas != current {
            return Err(SharedError::CasMismatch);
        }
        map.insert(key.to_string(), (value.to_vec(), current + 1));
        Ok(())
    }
    fn send_http_reply(&self, status: u32, headers: &[(&str, &[u8])], body: &[u8]) {
        self.count("reply");
        let headers = headers.iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v).into_owned())).collect();
        let body = String::from_utf8_lossy(body).into_owned();
        self.replies.borrow_mut().push(Reply { context: self.context.get(), status, headers, body });
    }
    fn define_metric(&self, _kind: MetricKind, name: &str) -> Option<u32> {
        let mut ids = self.process.metric_ids.borrow_mut();
        if let Some(id) = ids.get(name) {
            return Some(*id);
        }
        let mut m = self.process.metrics.borrow_mut();
        m.push((name.to_string(), 0));
        let id = (m.len() - 1) as u32;
        ids.insert(name.to_string(), id);
        Some(id)
    }
    fn metric_add(&self, id: u32, delta: i64) {
        self.count("metric");
        if let Some((_, v)) = self.process.metrics.borrow_mut().get_mut(id as usize) {
            *v += delta;
        }
    }
    fn metric_get(&self, id: u32) -> Option<u64> {
        self.process.metrics.borrow().get(id as usize).map(|(_, v)| *v as u64)
    }
    fn metric_set(&self, id: u32, value: u64) {
        if let Some((_, v)) = self.process.metrics.borrow_mut().get_mut(id as usize) {
            *v = value as i64;
        }
    }
    fn enter(&self, context_id: u32) -> bool {
        self.context.set(context_id);
        true
    }
    fn pace_tick(&self, fine: bool) -> bool {
        self.count("pace_tick");
        self.tick_fine.set(fine);
        true
    }
    fn resume_request(&self) {
        self.resumed.borrow_mut().push(self.context.get());
    }
    fn enqueue(&self, queue: u32, message: &[u8]) -> bool {
        self.count("enqueue");
        match self.process.queues.borrow_mut().get_mut(&queue) {
            Some(q) => {
                q.push_back(message.to_vec());
                true
            }
            None => false,
        }
    }
    fn dequeue(&self, queue: u32) -> Option<Vec<u8>> {
        self.process.queues.borrow_mut().get_mut(&queue).and_then(|q| q.pop_front())
    }
}

/// One worker of a fake process, for request-path scenarios: its host, its state (its wake-up
/// queue is token `id`) and its compiled configuration.
pub struct Worker {
    pub host: FakeHost,
    pub vm: crate::vm::Vm,
    pub c: Rc<crate::Compiled>,
}

impl Worker {
    /// The first worker of a new process, with the configuration `config` (JSON).
    pub fn first(config: &str) -> Worker {
        Worker::new(FakeHost::new(), 1, config)
    }
    /// Another worker of `of`'s process.
    pub fn second(of: &Worker, config: &str) -> Worker {
        Worker::new(FakeHost::worker_of(&of.host), 2, config)
    }
    fn new(host: FakeHost, id: u32, config: &str) -> Worker {
        host.process.queues.borrow_mut().insert(id, alloc::collections::VecDeque::new());
        let parsed = crate::config::parse(config.as_bytes()).unwrap_or_else(|e| panic!("test config: {e}"));
        let c = Rc::new(crate::Compiled::new(parsed, "test"));
        c.create_shared_state(&host);
        let vm = crate::vm::Vm::new(id, true);
        vm.register(&c);
        vm.renew_roster(&host, 0, true);
        Worker { host, vm, c }
    }
    /// The same worker with a new configuration (a reload: a new root context, the same VM).
    pub fn reconfigure(&mut self, config: &str) {
        let parsed = crate::config::parse(config.as_bytes()).unwrap_or_else(|e| panic!("test config: {e}"));
        self.c = Rc::new(crate::Compiled::new(parsed, "test"));
        self.c.create_shared_state(&self.host);
        self.vm.register(&self.c);
    }
    /// Request headers of stream `ticket` on route `route`, with `headers`.
    pub fn send_with(
        &self,
        route: &str,
        ticket: u32,
        headers: &[(&str, &str)],
    ) -> (crate::filter::Action, crate::filter::Stream) {
        self.host.new_stream();
        self.host.set_prop("xds.route_name", route.as_bytes());
        for (k, v) in headers {
            self.host.set_header(k, v);
        }
        self.host.context.set(ticket);
        crate::filter::on_request_headers(&self.c, &self.host, &self.vm, ticket)
    }
    pub fn send(&self, route: &str, ticket: u32) -> (crate::filter::Action, crate::filter::Stream) {
        self.send_with(route, ticket, &[])
    }
    /// The upstream's response headers pass: `status` (0: none came), with Envoy's
    /// `x-envoy-upstream-service-time` of `upstream_ms` and the other `headers`.
    pub fn respond(&self, stream: &mut crate::filter::Stream, status: u16, upstream_ms: u64, headers: &[(&str, &str)]) {
        if status == 0 {
            return;
        }
        self.host.response_headers.borrow_mut().clear();
        self.host.set_response_header(":status", status.to_string());
        self.host.set_response_header("x-envoy-upstream-service-time", upstream_ms.to_string());
        for (k, v) in headers {
            self.host.set_response_header(k, v);
        }
        crate::filter::on_response_headers(&self.c, &self.host, stream);
    }
    /// Stream `ticket` ends after `attempts` upstream attempts with `status` (0: no response,
    /// e.g. the client left).
    pub fn end_after(&self, ticket: u32, mut stream: crate::filter::Stream, attempts: u64, status: u16) {
        self.respond(&mut stream, status, 1, &[]);
        self.host.set_prop_u64("response.code", u64::from(status));
        self.host.set_prop_u64("upstream.request_attempt_count", attempts);
        self.host.set_prop_u64("response.flags", 0);
        self.log(ticket, stream);
    }
    /// The end of stream `ticket` (`proxy_on_delete`).
    pub fn log(&self, ticket: u32, stream: crate::filter::Stream) {
        crate::filter::on_end(&self.c, &self.host, &self.vm, ticket, stream);
    }
    /// Stream `ticket` ends with `status` after one attempt.
    pub fn end(&self, ticket: u32, stream: crate::filter::Stream, status: u16) {
        self.end_after(ticket, stream, 1, status);
    }
    /// `on_queue_ready`: the streams this worker resumes.
    pub fn wake(&self) -> Vec<u32> {
        self.host.resumed.borrow_mut().clear();
        crate::bulkhead::on_message(&self.host, &self.vm, self.vm.worker.get());
        self.host.resumed.borrow().clone()
    }
    /// `on_tick`.
    pub fn tick(&self) {
        crate::tick::tick(&self.host, &self.vm);
    }
    /// `n` ticks 50 ms apart from `from` (ns), with one request on `route` served (200) before
    /// each: a calm worker, for the tick's pace. Returns the time of the last tick.
    pub fn calm_ticks(&self, route: &str, from: u64, n: u32) -> u64 {
        let mut t = from;
        for i in 0..n {
            t += 50 * breakwater_policies::MS;
            let (action, s) = self.at(t).send(route, 100 + i);
            assert_eq!(action, crate::filter::Action::Continue, "a calm worker admits request {i}");
            self.end(100 + i, s, 200);
            self.tick();
        }
        t
    }
    pub fn at(&self, ns: u64) -> &Self {
        self.host.now.set(ns);
        self
    }
    /// A stat (its name without the `breakwater_` prefix) as Envoy would show it after this
    /// worker's next tick: the worker's counts are flushed first, and nothing else happens.
    pub fn stat(&self, name: &str) -> i64 {
        for p in &self.c.policies {
            let counts = p.local(|l| core::mem::take(&mut l.counts));
            p.metrics(&self.host).flush(&self.host, &counts);
        }
        self.host.metric(name)
    }
}
