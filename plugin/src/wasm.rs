//! The proxy-wasm adapter: Envoy's callbacks in, [`Host`] calls out. Nothing else lives here.
//!
//! Both directions are hand-written against the proxy-wasm ABI 0.2.1 instead of the SDK
//! (proxy-wasm 0.2.5), for two reasons:
//! * **Host calls** ([`abi`]): the SDK's wrappers unwrap the UTF-8 conversion of header values
//!   and panic on host statuses they do not expect, and a panic traps the VM — every request on
//!   that worker with it. Here a bad status is an absent value, and a value is bytes.
//! * **Callbacks** ([`exports`]): Envoy enters the VM only for the callbacks a module exports
//!   (proxy-wasm-cpp-host `ContextBase::onLog`, `onDone`, …: no export, no call), and each entry
//!   costs about 1.5k instructions per request (callgrind, Envoy 1.40: the SDK's no-op filter
//!   without `proxy_on_log` and `proxy_on_done` runs 171.4k instead of 174.4k per request). The
//!   SDK exports every callback; this module exports only those Breakwater needs and ends a
//!   stream in `proxy_on_delete`, which Envoy calls last on every stream, after `on_log` and
//!   `on_done` (resets and local replies included). It also drops the SDK's panics on an
//!   unknown context id.

use crate::config;
use crate::filter::{self, Stream};
use crate::host::{Host, MetricKind, SharedError};
use crate::vm::Vm;
use crate::{bulkhead, tick, Compiled};
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

std::thread_local! {
    /// This worker's state, shared by all its root contexts.
    /// (Leaked: it lives as long as the VM, and a reference costs no count on every callback.)
    static VM: &'static Vm = alloc::boxed::Box::leak(alloc::boxed::Box::new(Vm::default()));
    /// This worker's root contexts, and the one that ticks and receives the wake-up queue.
    static ROOTS: RefCell<Roots> = RefCell::new(Roots::default());
    /// The context of the callback running now: where host calls go back to after one made on
    /// behalf of another context (the ticker's pace).
    static CURRENT: core::cell::Cell<u32> = const { core::cell::Cell::new(0) };
}

fn vm() -> &'static Vm {
    VM.with(|v| *v)
}

/// The root contexts of this VM (one per filter instance and configuration). Only one of them
/// ticks and receives the wake-up queue: the tick visits every configuration's policies, and
/// thousands of per-route filter instances must not mean thousands of timers.
#[derive(Default)]
struct Roots {
    /// Live root contexts and their sync intervals.
    live: Vec<(u32, u64)>,
    /// The one that ticks (0: none yet), at what interval.
    ticker: (u32, u64),
    /// The ticker's period as last set, ns.
    period: u64,
    queue_name: String,
}

impl Roots {
    /// Makes the live root with the shortest sync interval the ticker (the newest on a tie) and
    /// gives it the wake-up queue. Called from a root context's callback; `current` is its id.
    fn elect(&mut self, current: u32) {
        let best = self.live.iter().rev().min_by_key(|(_, interval)| *interval).copied();
        let Some((id, interval)) = best else {
            self.ticker = (0, 0);
            return;
        };
        if self.ticker == (id, interval) {
            return;
        }
        let (old, _) = self.ticker;
        if old != 0 && old != id && self.live.iter().any(|(r, _)| *r == old) && abi::enter(old) {
            abi::set_tick_period(0);
        }
        if abi::enter(id) {
            abi::set_tick_period(interval);
            self.period = interval;
            let vm = vm();
            vm.paced_fine();
            self.register_queue(vm);
        }
        abi::enter(current);
        self.ticker = (id, interval);
    }

    /// Sets the ticker's period: its sync interval (`fine`), or [`tick::COARSE_NS`] if longer.
    /// `current`: the context to go back to.
    fn pace(&mut self, fine: bool, current: u32) -> bool {
        let (id, interval) = self.ticker;
        if id == 0 {
            return false;
        }
        let period = if fine { interval } else { interval.max(tick::COARSE_NS) };
        if period != self.period {
            if !abi::enter(id) {
                return false;
            }
            abi::set_tick_period(period);
            self.period = period;
            abi::enter(current);
        }
        true
    }

    /// Registers this VM's wake-up queue on the current root context. Its token, unique in the
    /// process, is the worker's id in bulkhead state; registering the same name again returns
    /// the same token and moves `on_queue_ready` to this context.
    fn register_queue(&mut self, vm: &Vm) {
        if self.queue_name.is_empty() {
            // Random, so that the VMs of one vm_id (one per worker) get queues of their own.
            self.queue_name = alloc::format!("breakwater/v1/wake/{:016x}", random());
        }
        match abi::register_shared_queue(&self.queue_name) {
            Some(token) if token != 0 => {
                if vm.worker.get() == 0 || !vm.can_wait.get() {
                    vm.worker.set(token);
                    vm.can_wait.set(true);
                }
            }
            _ => log::warn!("no wake-up queue: bulkhead requests cannot wait"),
        }
        if vm.worker.get() == 0 {
            // Without a queue the worker still needs a distinct id for its permits.
            vm.worker.set((random() as u32) | 0x8000_0000);
        }
    }
}

fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// The raw proxy-wasm ABI (the same imports the SDK declares), with statuses checked.
mod abi {
    use alloc::vec::Vec;

    const OK: u32 = 0;
    const CAS_MISMATCH: u32 = 8;
    const HTTP_REQUEST_HEADERS: u32 = 0;
    const HTTP_RESPONSE_BODY: u32 = 1;
    const HTTP_RESPONSE_HEADERS: u32 = 2;
    const HTTP_RESPONSE_TRAILERS: u32 = 3;
    const PLUGIN_CONFIGURATION: u32 = 7;
    const STREAM_HTTP_REQUEST: u32 = 0;

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
        fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
        fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        fn proxy_get_header_map_pairs(map_type: u32, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
        fn proxy_get_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        fn proxy_replace_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
        fn proxy_get_property(
            path_data: *const u8,
            path_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        fn proxy_get_shared_data(
            key_data: *const u8,
            key_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
            return_cas: *mut u32,
        ) -> u32;
        fn proxy_set_shared_data(
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32;
        fn proxy_register_shared_queue(name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
        fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> u32;
        fn proxy_dequeue_shared_queue(queue_id: u32, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
        fn proxy_send_local_response(
            status_code: u32,
            details_data: *const u8,
            details_size: usize,
            body_data: *const u8,
            body_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
        fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
        fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
        fn proxy_get_metric(metric_id: u32, return_value: *mut u64) -> u32;
        fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
        fn proxy_set_effective_context(context_id: u32) -> u32;
        fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
        fn proxy_call_foreign_function(
            name_data: *const u8,
            name_size: usize,
            args_data: *const u8,
            args_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        fn proxy_continue_stream(stream_type: u32) -> u32;
    }

    /// Takes ownership of a buffer the host allocated in this VM (through the SDK's exported
    /// `proxy_on_memory_allocate`, a `Vec::with_capacity`), as the SDK does.
    fn owned(status: u32, data: *mut u8, size: usize) -> Option<Vec<u8>> {
        if status != OK || data.is_null() {
            return None;
        }
        // SAFETY: on OK the host wrote a pointer it got from our allocator for `size` bytes.
        Some(unsafe { Vec::from_raw_parts(data, size, size) })
    }

    pub fn log(level: u32, message: &str) {
        // SAFETY: a pointer and length into a live string.
        unsafe { proxy_log(level, message.as_ptr(), message.len()) };
    }

    struct Logger;

    impl log::Log for Logger {
        fn enabled(&self, metadata: &log::Metadata) -> bool {
            metadata.level() <= log::max_level()
        }
        fn log(&self, record: &log::Record) {
            if !self.enabled(record.metadata()) {
                return;
            }
            let level = match record.level() {
                log::Level::Trace => 0,
                log::Level::Debug => 1,
                log::Level::Info => 2,
                log::Level::Warn => 3,
                log::Level::Error => 4,
            };
            log(level, &alloc::format!("{}", record.args()));
        }
        fn flush(&self) {}
    }

    static LOGGER: Logger = Logger;

    /// Logs through the host, ignoring its status (the SDK's logger unwraps it). A panic (a
    /// bug: clippy denies the usual sources) is logged as critical before the VM traps.
    pub fn install_logger() {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
        std::panic::set_hook(alloc::boxed::Box::new(|info| log(5, &alloc::format!("breakwater: {info}"))));
    }

    pub fn now_ns() -> u64 {
        let mut t = 0u64;
        // SAFETY: the host writes a u64 into a live local.
        let status = unsafe { proxy_get_current_time_nanoseconds(&mut t) };
        if status == OK {
            t
        } else {
            0
        }
    }

    pub fn set_tick_period(period_ns: u64) {
        // Milliseconds; under 1 ms a tick is 0, which disables the timer: at least 1.
        let ms = u32::try_from((period_ns / 1_000_000).max(u64::from(period_ns > 0))).unwrap_or(u32::MAX);
        // SAFETY: plain integers.
        let status = unsafe { proxy_set_tick_period_milliseconds(ms) };
        if status != OK {
            log::warn!("no tick (status {status}): stats and batched successes will lag");
        }
    }

    pub fn plugin_configuration() -> Vec<u8> {
        let (mut data, mut size) = (core::ptr::null_mut(), 0);
        // SAFETY: the host writes a pointer and a size into live locals.
        let status = unsafe { proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, usize::MAX, &mut data, &mut size) };
        owned(status, data, size).unwrap_or_default()
    }

    fn map_type(response: bool, trailers: bool) -> u32 {
        match (response, trailers) {
            (false, _) => HTTP_REQUEST_HEADERS,
            (true, false) => HTTP_RESPONSE_HEADERS,
            (true, true) => HTTP_RESPONSE_TRAILERS,
        }
    }

    pub fn header(response: bool, trailers: bool, name: &str) -> Option<Vec<u8>> {
        let (mut data, mut size) = (core::ptr::null_mut(), 0);
        // SAFETY: a live key; the host writes a pointer and a size into live locals.
        let status = unsafe {
            proxy_get_header_map_value(map_type(response, trailers), name.as_ptr(), name.len(), &mut data, &mut size)
        };
        owned(status, data, size)
    }

    pub fn headers(response: bool) -> Option<Vec<u8>> {
        let (mut data, mut size) = (core::ptr::null_mut(), 0);
        // SAFETY: the host writes a pointer and a size into live locals.
        let status = unsafe { proxy_get_header_map_pairs(map_type(response, false), &mut data, &mut size) };
        owned(status, data, size)
    }

    pub fn set_header(response: bool, name: &str, value: &[u8]) -> u32 {
        // SAFETY: live key and value.
        unsafe {
            proxy_replace_header_map_value(
                map_type(response, false),
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        }
    }

    pub fn response_body(size: usize) -> Option<Vec<u8>> {
        let (mut data, mut size_out) = (core::ptr::null_mut(), 0);
        // SAFETY: the host writes a pointer and a size into live locals.
        let status = unsafe { proxy_get_buffer_bytes(HTTP_RESPONSE_BODY, 0, size, &mut data, &mut size_out) };
        owned(status, data, size_out)
    }

    pub fn set_property(name: &str, value: &[u8]) -> bool {
        // SAFETY: a live name and value.
        unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) == OK }
    }

    /// Envoy's foreign function `clear_route_cache`.
    pub fn clear_route_cache() -> bool {
        let name = "clear_route_cache";
        let (mut data, mut size) = (core::ptr::null_mut(), 0);
        // SAFETY: a live name, no arguments; the host writes a pointer and a size into live locals.
        let status = unsafe {
            proxy_call_foreign_function(name.as_ptr(), name.len(), core::ptr::null(), 0, &mut data, &mut size)
        };
        drop(owned(status, data, size));
        status == OK
    }

    pub fn remove_response_header(name: &str) -> u32 {
        // SAFETY: a live key.
        unsafe { proxy_remove_header_map_value(HTTP_RESPONSE_HEADERS, name.as_ptr(), name.len()) }
    }

    pub fn property(path: &[&str]) -> Option<Vec<u8>> {
        // Path segments joined by NUL, as the ABI wants.
        let mut p = Vec::with_capacity(path.iter().map(|s| s.len() + 1).sum());
        for (i, seg) in path.iter().enumerate() {
            if i > 0 {
                p.push(0);
            }
            p.extend_from_slice(seg.as_bytes());
        }
        property_path(&p)
    }

    /// A property by its path as the ABI wants it (segments joined by NUL).
    pub fn property_path(p: &[u8]) -> Option<Vec<u8>> {
        let (mut data, mut size) = (core::ptr::null_mut(), 0);
        // SAFETY: a live path; the host writes a pointer and a size into live locals.
        let status = unsafe { proxy_get_property(p.as_ptr(), p.len(), &mut data, &mut size) };
        owned(status, data, size)
    }

    pub fn shared_get(key: &str) -> Option<(Vec<u8>, u32)> {
        let (mut data, mut size, mut cas) = (core::ptr::null_mut(), 0, 0u32);
        // SAFETY: a live key; the host writes into live locals.
        let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
        owned(status, data, size).map(|v| (v, cas))
    }

    pub fn shared_set(key: &str, value: &[u8], cas: u32) -> Result<(), bool> {
        // SAFETY: a live key and value.
        match unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) } {
            OK => Ok(()),
            CAS_MISMATCH => Err(true),
            _ => Err(false),
        }
    }

    pub fn register_shared_queue(name: &str) -> Option<u32> {
        let mut id = 0u32;
        // SAFETY: a live name; the host writes a u32 into a live local.
        let status = unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) };
        (status == OK).then_some(id)
    }

    pub fn enqueue(queue: u32, message: &[u8]) -> bool {
        // SAFETY: a live message.
        unsafe { proxy_enqueue_shared_queue(queue, message.as_ptr(), message.len()) == OK }
    }

    pub fn dequeue(queue: u32) -> Option<Vec<u8>> {
        let (mut data, mut size) = (core::ptr::null_mut(), 0);
        // SAFETY: the host writes a pointer and a size into live locals.
        let status = unsafe { proxy_dequeue_shared_queue(queue, &mut data, &mut size) };
        owned(status, data, size)
    }

    pub fn send_local_response(status: u32, headers: &[u8], body: &[u8]) -> u32 {
        // SAFETY: live buffers; -1: no gRPC status of our own (Envoy maps the HTTP status).
        unsafe {
            proxy_send_local_response(
                status,
                core::ptr::null(),
                0,
                body.as_ptr(),
                body.len(),
                headers.as_ptr(),
                headers.len(),
                -1,
            )
        }
    }

    pub fn define_metric(kind: u32, name: &str) -> Option<u32> {
        let mut id = 0u32;
        // SAFETY: a live name; the host writes a u32 into a live local.
        let status = unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) };
        (status == OK).then_some(id)
    }

    pub fn increment_metric(id: u32, delta: i64) {
        // SAFETY: plain integers.
        unsafe { proxy_increment_metric(id, delta) };
    }

    pub fn get_metric(id: u32) -> Option<u64> {
        let mut value = 0u64;
        // SAFETY: the host writes a u64 into a live local.
        (unsafe { proxy_get_metric(id, &mut value) } == OK).then_some(value)
    }

    pub fn record_metric(id: u32, value: u64) {
        // SAFETY: plain integers.
        unsafe { proxy_record_metric(id, value) };
    }

    pub fn enter(context_id: u32) -> bool {
        // SAFETY: a plain integer.
        unsafe { proxy_set_effective_context(context_id) == OK }
    }

    pub fn continue_request() -> u32 {
        // SAFETY: a plain integer.
        unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) }
    }
}

/// Host calls for the current context (proxy-wasm calls are implicitly scoped to it).
pub struct WasmHost;

impl Host for WasmHost {
    fn now_ns(&self) -> u64 {
        abi::now_ns()
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        abi::property(path)
    }
    fn route_name(&self) -> Option<Vec<u8>> {
        abi::property_path(b"xds\0route_name")
    }
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        abi::header(false, false, name)
    }
    fn set_request_header(&self, name: &str, value: &[u8]) {
        let status = abi::set_header(false, name, value);
        if status != 0 {
            log::warn!("setting {name} failed: status {status}");
        }
    }
    fn response_headers(&self) -> Option<Vec<u8>> {
        abi::headers(true)
    }
    fn set_response_header(&self, name: &str, value: &[u8]) {
        abi::set_header(true, name, value);
    }
    fn request_headers(&self) -> Option<Vec<u8>> {
        abi::headers(false)
    }
    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        abi::response_body(size)
    }
    fn set_property(&self, name: &str, value: &[u8]) -> bool {
        abi::set_property(name, value)
    }
    fn clear_route_cache(&self) -> bool {
        abi::clear_route_cache()
    }
    fn remove_response_header(&self, name: &str) {
        abi::remove_response_header(name);
    }
    fn response_trailer(&self, name: &str) -> Option<Vec<u8>> {
        abi::header(true, true, name)
    }
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        abi::shared_get(key).filter(|(bytes, _)| !bytes.is_empty())
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SharedError> {
        abi::shared_set(key, value, cas)
            .map_err(|mismatch| if mismatch { SharedError::CasMismatch } else { SharedError::Other })
    }
    fn send_http_reply(&self, status: u32, headers: &[(&str, &[u8])], body: &[u8]) {
        // The reject reply's few headers fit on the stack: no allocation on a fast-fail.
        let mut small = [0u8; 256];
        let large;
        let serialized: &[u8] = match crate::headers::serialize_into(headers, &mut small) {
            Some(n) => small.get(..n).unwrap_or_default(),
            None => {
                large = crate::headers::serialize(headers);
                &large
            }
        };
        let result = abi::send_local_response(status, serialized, body);
        if result != 0 {
            log::warn!("local reply failed: status {result}");
        }
    }
    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => 0,
            MetricKind::Gauge => 1,
            MetricKind::Histogram => 2,
        };
        abi::define_metric(kind, name)
    }
    fn metric_add(&self, id: u32, delta: i64) {
        abi::increment_metric(id, delta);
    }
    fn metric_set(&self, id: u32, value: u64) {
        abi::record_metric(id, value);
    }
    fn metric_get(&self, id: u32) -> Option<u64> {
        abi::get_metric(id)
    }
    fn enter(&self, context_id: u32) -> bool {
        abi::enter(context_id)
    }
    fn resume_request(&self) {
        let status = abi::continue_request();
        if status != 0 {
            log::warn!("resuming a queued request failed: status {status}");
        }
    }
    fn enqueue(&self, queue: u32, message: &[u8]) -> bool {
        abi::enqueue(queue, message)
    }
    fn dequeue(&self, queue: u32) -> Option<Vec<u8>> {
        abi::dequeue(queue)
    }
    fn pace_tick(&self, fine: bool) -> bool {
        let current = CURRENT.with(core::cell::Cell::get);
        ROOTS.with(|r| r.try_borrow_mut().is_ok_and(|mut r| r.pace(fine, current)))
    }
}

/// Envoy's callbacks, as the ABI names them. Only these are exported: see the module doc.
mod exports {
    use super::{abi, Http, Root, CURRENT};
    use core::cell::RefCell;
    use foldhash::fast::FixedState;
    use hashbrown::HashMap;

    /// By context id. Envoy numbers contexts itself: a fixed seed needs no random state, so
    /// the maps are built at compile time and a callback checks no lazy initialisation.
    type ById<V> = HashMap<u32, V, FixedState>;

    /// proxy-wasm's `Action` and the booleans Envoy reads from a callback's `u32`.
    const CONTINUE: u32 = 0;
    const PAUSE: u32 = 1;

    std::thread_local! {
        /// This worker's root contexts (one per filter instance and configuration) and its live
        /// streams, by context id.
        static ROOT_CONTEXTS: RefCell<ById<Root>> = const { RefCell::new(HashMap::with_hasher(FixedState::with_seed(0))) };
        static STREAMS: RefCell<ById<Http>> = const { RefCell::new(HashMap::with_hasher(FixedState::with_seed(0))) };
    }

    /// Runs `f` on stream `id`; an unknown id (or a callback re-entered while one runs, which
    /// Envoy does not do) is a no-op with `default`, never a trap.
    fn with_stream<T>(id: u32, default: T, f: impl FnOnce(&mut Http) -> T) -> T {
        CURRENT.with(|c| c.set(id));
        STREAMS.with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.get_mut(&id).map(f))).unwrap_or(default)
    }

    fn with_root<T>(id: u32, default: T, f: impl FnOnce(&mut Root) -> T) -> T {
        CURRENT.with(|c| c.set(id));
        ROOT_CONTEXTS.with(|r| r.try_borrow_mut().ok().and_then(|mut r| r.get_mut(&id).map(f))).unwrap_or(default)
    }

    extern "C" {
        #[cfg(target_os = "wasi")]
        fn __wasm_call_ctors();
    }

    /// The reactor's start (what the SDK's `main!` writes): static constructors, then the logger.
    #[no_mangle]
    pub extern "C" fn _initialize() {
        // SAFETY: called once by the host before any other export, as wasi-libc expects.
        #[cfg(target_os = "wasi")]
        unsafe {
            __wasm_call_ctors();
        }
        abi::install_logger();
    }

    /// The ABI version Envoy checks by this export's name.
    #[no_mangle]
    pub extern "C" fn proxy_abi_version_0_2_1() {}

    /// The buffer Envoy copies returned data into; [`abi`] takes it back with
    /// `Vec::from_raw_parts(ptr, size, size)`, so it is allocated as a `Vec<u8>` of exactly `size`.
    #[no_mangle]
    pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
        let mut v = core::mem::ManuallyDrop::new(alloc::vec::Vec::<u8>::with_capacity(size));
        v.as_mut_ptr()
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_context_create(id: u32, root_id: u32) {
        if root_id == 0 {
            ROOT_CONTEXTS.with(|r| {
                if let Ok(mut r) = r.try_borrow_mut() {
                    r.insert(id, Root { id, compiled: None });
                }
            });
            return;
        }
        let compiled = with_root(root_id, None, |r| r.compiled.clone());
        STREAMS.with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                s.insert(id, Http::new(id, compiled));
            }
        });
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_vm_start(_id: u32, _size: usize) -> u32 {
        1
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_configure(id: u32, _size: usize) -> u32 {
        u32::from(with_root(id, false, Root::on_configure))
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_tick(id: u32) {
        with_root(id, (), |r| r.on_tick());
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_queue_ready(id: u32, queue_id: u32) {
        with_root(id, (), |r| r.on_queue_ready(queue_id));
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_request_headers(id: u32, _num_headers: usize, _end_of_stream: u32) -> u32 {
        if with_stream(id, false, Http::on_request_headers) {
            PAUSE
        } else {
            CONTINUE
        }
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_response_headers(id: u32, _num_headers: usize, end_of_stream: u32) -> u32 {
        with_stream(id, (), |h| h.on_response_headers(end_of_stream != 0));
        CONTINUE
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_response_body(id: u32, body_size: usize, end_of_stream: u32) -> u32 {
        with_stream(id, (), |h| h.on_response_body(body_size, end_of_stream != 0));
        CONTINUE
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_response_trailers(id: u32, _num_trailers: usize) -> u32 {
        with_stream(id, (), Http::on_response_trailers);
        CONTINUE
    }

    /// The last callback of every context. A stream ends here (what `on_log` would do); a root
    /// context hands over the tick (what `on_done` would do: Envoy calls `on_delete` right after
    /// a root context's `on_done`, proxy-wasm-cpp-host `WasmBase::startShutdown`).
    #[no_mangle]
    pub extern "C" fn proxy_on_delete(id: u32) {
        CURRENT.with(|c| c.set(id));
        // Out of the map first: ending a stream may call the host, never with a borrow held.
        let stream = STREAMS.with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.remove(&id)));
        if let Some(mut h) = stream {
            h.on_end();
            return;
        }
        let root = ROOT_CONTEXTS.with(|r| r.try_borrow_mut().ok().and_then(|mut r| r.remove(&id)));
        if let Some(r) = root {
            r.on_end();
        }
    }
}

struct Root {
    id: u32,
    compiled: Option<Rc<Compiled>>,
}

impl Root {
    /// The root context is going away (a configuration change, or shutdown): another root
    /// context of this VM takes over the tick and the wake-up queue, and every count still on
    /// the worker goes to Envoy now (the last root leaves no tick behind to do it).
    fn on_end(&self) {
        ROOTS.with(|r| {
            if let Ok(mut r) = r.try_borrow_mut() {
                r.live.retain(|(id, _)| *id != self.id);
                r.elect(self.id);
            }
        });
        let vm = vm();
        tick::tick(&WasmHost, vm);
        tick::flush_all(&WasmHost, vm);
    }

    fn on_configure(&mut self) -> bool {
        let bytes = abi::plugin_configuration();
        if bytes.iter().all(u8::is_ascii_whitespace) {
            log::warn!("the plugin configuration is empty: Breakwater applies no policy");
        }
        match config::parse(&bytes) {
            Ok(cfg) => {
                let namespace =
                    WasmHost.property(&["plugin_root_id"]).and_then(|b| String::from_utf8(b).ok()).unwrap_or_default();
                let (policies, interval) = (cfg.policies.len(), cfg.sync_interval_ns);
                let compiled = Compiled::new(cfg, &namespace);
                let control = compiled.control.is_some();
                compiled.create_shared_state(&WasmHost);
                let compiled = Rc::new(compiled);
                let vm = vm();
                self.compiled = Some(compiled.clone());
                if control {
                    // The control endpoint has no policies of its own: it neither ticks nor
                    // takes the wake-up queue.
                    log::info!("control endpoint configured");
                    return true;
                }
                vm.register(&compiled);
                ROOTS.with(|r| {
                    if let Ok(mut r) = r.try_borrow_mut() {
                        r.live.retain(|(id, _)| *id != self.id);
                        r.live.push((self.id, interval));
                        r.elect(self.id);
                    }
                });
                // Other workers find this one (to tell it of breaker changes) in the roster.
                vm.renew_roster(&WasmHost, vm.clock(&WasmHost), true);
                log::debug!("configured {policies} policies");
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
        tick::tick(&WasmHost, vm());
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        bulkhead::on_message(&WasmHost, vm(), queue_id);
    }
}

struct Http {
    compiled: Option<Rc<Compiled>>,
    /// The context id: a queued request's ticket, by which it is woken.
    id: u32,
    stream: Stream,
    /// A request whose answer the policy's fallback cache may store, and that answer as it is
    /// captured.
    pending: Option<crate::fallback::Pending>,
    capture: Option<crate::fallback::Capture>,
}

impl Http {
    fn new(id: u32, compiled: Option<Rc<Compiled>>) -> Http {
        Http { compiled, id, stream: Stream::Untracked, pending: None, capture: None }
    }

    /// True: pause the request (refused with a local reply, or queued).
    fn on_request_headers(&mut self) -> bool {
        #[cfg(feature = "test-trap")]
        if WasmHost.request_header("x-breakwater-test-trap").is_some() {
            // Test builds only (never the release .wasm): trap the VM on demand.
            core::arch::wasm32::unreachable();
        }
        let Some(c) = &self.compiled else { return false };
        if let Some(a) = &c.control {
            return match crate::control::handle(a, &WasmHost, vm()) {
                Some(reply) => {
                    let headers: [(&str, &[u8]); 2] =
                        [("content-type", b"application/json"), ("cache-control", b"no-store")];
                    WasmHost.send_http_reply(reply.status, &headers, reply.body.as_bytes());
                    true
                }
                None => false,
            };
        }
        if c.is_idle() {
            return false;
        }
        let vm = vm();
        let (action, stream) = filter::on_request_headers(c, &WasmHost, vm, self.id);
        self.stream = stream;
        if c.fallbacks {
            self.pending = crate::fallback::on_request_headers(c, &WasmHost, vm, &self.stream);
        }
        action == filter::Action::Stop
    }

    fn on_response_headers(&mut self, end_of_stream: bool) {
        if let Some(c) = &self.compiled {
            let read = filter::on_response_headers(c, &WasmHost, &mut self.stream);
            if !c.fallbacks {
                return;
            }
            self.capture = crate::fallback::on_response_headers(
                c,
                &WasmHost,
                vm(),
                self.id,
                &self.stream,
                read.as_deref(),
                end_of_stream,
                self.pending.take(),
            );
        }
    }

    fn on_response_body(&mut self, body_size: usize, end_of_stream: bool) {
        if self.capture.is_some() {
            crate::fallback::on_response_body(&WasmHost, &mut self.capture, body_size, end_of_stream);
        }
    }

    fn on_response_trailers(&mut self) {
        if let Some(c) = &self.compiled {
            filter::on_response_trailers(c, &WasmHost, &mut self.stream);
        }
    }

    /// The stream is over, however it ended (answered, reset, refused, the client gone).
    fn on_end(&mut self) {
        if let Some(c) = &self.compiled {
            filter::on_end(c, &WasmHost, vm(), self.id, core::mem::take(&mut self.stream));
        }
    }
}
