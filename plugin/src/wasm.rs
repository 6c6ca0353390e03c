//! The proxy-wasm adapter: Envoy's callbacks in, [`Host`] calls out. Nothing else lives here.

use crate::config;
use crate::filter::{self, Stream};
use crate::host::{Host, MetricKind, SharedError};
use crate::parking::Parking;
use crate::{bulkhead, Compiled};
use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { compiled: None }) });
}}

std::thread_local! {
    /// This worker's queued requests; one per VM, shared by its root contexts (a configuration
    /// reload adds a root context while requests queued under the old one still wait).
    static PARKING: Rc<Parking> = Rc::new(Parking::default());
    /// The name of this VM's wake-up queue, chosen once.
    static WAKE_QUEUE: core::cell::RefCell<String> = const { core::cell::RefCell::new(String::new()) };
}

fn parking() -> Rc<Parking> {
    PARKING.with(Rc::clone)
}

/// Registers this VM's wake-up queue. Its token, unique in the process, is the worker's id in
/// bulkhead state. Registering the same name again (a newer root context) returns the same
/// token and moves `on_queue_ready` to the newer context.
fn register_wake_queue(w: &Parking) {
    // Random, so that the VMs of one vm_id (one per worker) get queues of their own.
    let random = || {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new().build_hasher().finish()
    };
    let name = WAKE_QUEUE.with(|n| {
        let mut n = n.borrow_mut();
        if n.is_empty() {
            *n = format!("breakwater/v1/wake/{:016x}", random());
        }
        n.clone()
    });
    match hostcalls::register_shared_queue(&name) {
        Ok(token) if token != 0 && w.worker.get() == 0 => {
            w.worker.set(token);
            w.can_wait.set(true);
        }
        Ok(_) => {}
        Err(e) => log::warn!("no wake-up queue ({e:?}): bulkhead requests cannot wait"),
    }
    if w.worker.get() == 0 {
        // Without a queue the worker still needs a distinct id for its permits.
        w.worker.set((random() as u32) | 0x8000_0000);
    }
}

/// Raw proxy-wasm imports (the same ones the SDK declares), for calls whose SDK wrappers panic.
mod abi {
    pub const OK: u32 = 0;
    pub const HTTP_REQUEST: u32 = 0;
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_set_effective_context(context_id: u32) -> u32;
        pub fn proxy_continue_stream(stream_type: u32) -> u32;
    }
}

/// Host calls for the current context (proxy-wasm calls are implicitly scoped to it).
pub struct WasmHost;

impl Host for WasmHost {
    fn now_ns(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }
    fn request_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpRequestHeaders, name).ok().flatten()
    }
    fn set_request_header(&self, name: &str, value: &str) {
        if let Err(e) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)) {
            log::warn!("setting {name} failed: {e:?}");
        }
    }
    fn response_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpResponseHeaders, name).ok().flatten()
    }
    fn response_trailer(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpResponseTrailers, name).ok().flatten()
    }
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), cas)) if !bytes.is_empty() => Some((bytes, cas.unwrap_or(0))),
            _ => None,
        }
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SharedError> {
        match hostcalls::set_shared_data(key, Some(value), (cas != 0).then_some(cas)) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SharedError::CasMismatch),
            Err(_) => Err(SharedError::Other),
        }
    }
    fn send_http_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        if let Err(e) = hostcalls::send_http_response(status, headers.to_vec(), Some(body)) {
            log::warn!("local reply failed: {e:?}");
        }
    }
    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let t = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
            MetricKind::Histogram => MetricType::Histogram,
        };
        hostcalls::define_metric(t, name).ok()
    }
    fn metric_add(&self, id: u32, delta: i64) {
        let _ = hostcalls::increment_metric(id, delta);
    }
    fn metric_set(&self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }
    // These two go to the host directly: the SDK's wrappers panic on a status they do not
    // expect, and a request that vanished between its wake-up and now must not trap the VM.
    fn enter(&self, context_id: u32) -> bool {
        // SAFETY: a proxy-wasm ABI import taking a plain integer.
        unsafe { abi::proxy_set_effective_context(context_id) == abi::OK }
    }
    fn resume_request(&self) {
        // SAFETY: a proxy-wasm ABI import taking a plain integer (0: the HTTP request stream).
        let status = unsafe { abi::proxy_continue_stream(abi::HTTP_REQUEST) };
        if status != abi::OK {
            log::warn!("resuming a queued request failed: status {status}");
        }
    }
    fn enqueue(&self, queue: u32, message: &[u8]) -> bool {
        hostcalls::enqueue_shared_queue(queue, Some(message)).is_ok()
    }
    fn dequeue(&self, queue: u32) -> Option<Vec<u8>> {
        hostcalls::dequeue_shared_queue(queue).ok().flatten()
    }
}

struct Root {
    compiled: Option<Rc<Compiled>>,
}

impl Context for Root {
    /// The root context is going away (a configuration reload, or shutdown): hand the batched
    /// successes over now, since this context will not tick again.
    fn on_done(&mut self) -> bool {
        if let Some(c) = &self.compiled {
            filter::sync(c, &WasmHost);
        }
        true
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        // No configuration at all means no policies: every request passes untouched.
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &bytes };
        match config::parse(bytes) {
            Ok(cfg) => {
                let namespace =
                    WasmHost.property(&["plugin_root_id"]).and_then(|b| String::from_utf8(b).ok()).unwrap_or_default();
                let (policies, routes) = (cfg.policies.len(), cfg.routes.rules().len());
                let tick = core::time::Duration::from_nanos(cfg.sync_interval_ns);
                let compiled = Compiled::new(cfg, &WasmHost, &namespace);
                compiled.create_shared_state(&WasmHost);
                self.compiled = Some(Rc::new(compiled));
                register_wake_queue(&parking());
                if let Err(e) = hostcalls::set_tick_period(tick) {
                    log::warn!("no tick ({e:?}): batched successes will reach shared data only with failures");
                }
                log::debug!("configured {policies} policies, {routes} routes");
                true
            }
            Err(e) => {
                // One line naming the field; returning false makes Envoy refuse the whole config.
                log::error!("invalid configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let w = parking();
        if let Some(c) = &self.compiled {
            filter::sync(c, &WasmHost);
        }
        bulkhead::renew(&WasmHost, &w);
        bulkhead::expire(&WasmHost, &w);
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        bulkhead::wake(&WasmHost, &parking(), queue_id);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http { compiled: self.compiled.clone(), id: context_id, stream: Stream::Untracked }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    compiled: Option<Rc<Compiled>>,
    /// The context id: a queued request's ticket, by which it is woken.
    id: u32,
    stream: Stream,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(c) = &self.compiled else { return Action::Continue };
        if c.config.routes.is_empty() {
            return Action::Continue;
        }
        let (action, stream) = filter::on_request_headers(c, &WasmHost, &parking(), self.id);
        self.stream = stream;
        match action {
            filter::Action::Continue => Action::Continue,
            filter::Action::Rejected | filter::Action::Queued => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if let Some(c) = &self.compiled {
            filter::on_response_headers(c, &WasmHost, &mut self.stream, end_of_stream);
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if let Some(c) = &self.compiled {
            filter::on_response_trailers(c, &WasmHost, &mut self.stream);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(c) = &self.compiled {
            filter::on_log(c, &WasmHost, &parking(), self.id, core::mem::take(&mut self.stream));
        }
    }
}
