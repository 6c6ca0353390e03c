//! Route rules: which policy, if any, governs a request. The first matching rule wins.
//!
//! Rules that name an Envoy route (`route_name`) are indexed by that name, so a request only
//! looks at the rules that could match it: the cost per request does not grow with the number
//! of named rules. Only the attributes some rule needs are read from the host, each at most
//! once, as bytes: a value that is not UTF-8 simply matches no rule that expects text.

use crate::host::Host;
use alloc::string::String;
use alloc::vec::Vec;
use hashbrown::HashMap;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Route {
    pub route_name: Option<String>,
    pub path_prefix: Option<String>,
    pub methods: Vec<String>,
    pub host: Option<HostPattern>,
    /// Lower-case names, exact values.
    pub headers: Vec<(String, String)>,
    pub cluster: Option<String>,
    /// Index into `Config::policies`.
    pub policy: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Exact(String),
    /// "*.example.com" is stored as ".example.com".
    Suffix(String),
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<HostPattern, &'static str> {
        let s = s.to_ascii_lowercase();
        if s == "*" {
            Ok(HostPattern::Any)
        } else if let Some(rest) = s.strip_prefix('*') {
            if rest.starts_with('.') && rest.len() > 1 && !rest.contains('*') {
                Ok(HostPattern::Suffix(rest.into()))
            } else {
                Err("expected a host such as \"api.example.com\", \"*.example.com\" or \"*\"")
            }
        } else if s.contains('*') {
            Err("a wildcard is only allowed as the first label, as in \"*.example.com\"")
        } else {
            Ok(HostPattern::Exact(s))
        }
    }

    /// `host` is the request's :authority; its port, if any, is ignored.
    pub fn matches(&self, host: &[u8]) -> bool {
        let host = strip_port(host);
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(h) => host.eq_ignore_ascii_case(h.as_bytes()),
            HostPattern::Suffix(sfx) => {
                let sfx = sfx.as_bytes();
                host.len() > sfx.len()
                    && host.get(host.len() - sfx.len()..).is_some_and(|tail| tail.eq_ignore_ascii_case(sfx))
            }
        }
    }
}

fn strip_port(host: &[u8]) -> &[u8] {
    let Some(colon) = host.iter().rposition(|b| *b == b':') else { return host };
    let (h, port) = (host.get(..colon).unwrap_or(host), host.get(colon + 1..).unwrap_or(&[]));
    // An IPv6 literal without port ("[::1]") has its last ':' inside the brackets.
    if !port.contains(&b']') && port.iter().all(u8::is_ascii_digit) {
        h
    } else {
        host
    }
}

/// The request attributes rules look at, fetched lazily.
pub trait Attributes {
    fn route_name(&mut self) -> Option<&[u8]>;
    fn path(&mut self) -> Option<&[u8]>;
    fn method(&mut self) -> Option<&[u8]>;
    fn host(&mut self) -> Option<&[u8]>;
    fn header(&mut self, name: &str) -> Option<Vec<u8>>;
    fn cluster(&mut self) -> Option<&[u8]>;
}

/// Request attributes read from the host on first use, at most once each.
pub struct HostAttributes<'h, H: Host> {
    host: &'h H,
    route_name: Option<Option<Vec<u8>>>,
    path: Option<Option<Vec<u8>>>,
    method: Option<Option<Vec<u8>>>,
    authority: Option<Option<Vec<u8>>>,
    cluster: Option<Option<Vec<u8>>>,
}

impl<'h, H: Host> HostAttributes<'h, H> {
    pub fn new(host: &'h H) -> Self {
        HostAttributes { host, route_name: None, path: None, method: None, authority: None, cluster: None }
    }
}

fn cached(slot: &mut Option<Option<Vec<u8>>>, read: impl FnOnce() -> Option<Vec<u8>>) -> Option<&[u8]> {
    slot.get_or_insert_with(|| read().filter(|v| !v.is_empty())).as_deref()
}

impl<H: Host> Attributes for HostAttributes<'_, H> {
    fn route_name(&mut self) -> Option<&[u8]> {
        let host = self.host;
        cached(&mut self.route_name, || host.property(&["xds", "route_name"]))
    }
    fn path(&mut self) -> Option<&[u8]> {
        let host = self.host;
        cached(&mut self.path, || host.request_header(":path"))
    }
    fn method(&mut self) -> Option<&[u8]> {
        let host = self.host;
        cached(&mut self.method, || host.request_header(":method"))
    }
    fn host(&mut self) -> Option<&[u8]> {
        let host = self.host;
        cached(&mut self.authority, || host.request_header(":authority"))
    }
    fn header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.host.request_header(name)
    }
    fn cluster(&mut self) -> Option<&[u8]> {
        let host = self.host;
        cached(&mut self.cluster, || host.property(&["xds", "cluster_name"]))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTable {
    rules: Vec<Route>,
    /// Rule indices by route_name, ascending.
    by_name: HashMap<String, Vec<u32>>,
    /// Rules without a route_name, ascending.
    unnamed: Vec<u32>,
    /// When every rule is a route_name and nothing else (how Istio recipes are written): the
    /// policy of the first rule of each name, so a request costs one lookup by its route name.
    names_only: Option<HashMap<Box<[u8]>, usize>>,
}

impl RouteTable {
    pub fn new(rules: Vec<Route>) -> Self {
        let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
        let mut unnamed = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            match &r.route_name {
                Some(n) => by_name.entry(n.clone()).or_default().push(i as u32),
                None => unnamed.push(i as u32),
            }
        }
        let only_names = |r: &Route| {
            r.route_name.is_some()
                && r.path_prefix.is_none()
                && r.methods.is_empty()
                && r.host.is_none()
                && r.headers.is_empty()
                && r.cluster.is_none()
        };
        let names_only = (!rules.is_empty() && rules.iter().all(only_names)).then(|| {
            let mut m: HashMap<Box<[u8]>, usize> = HashMap::new();
            for r in &rules {
                if let Some(n) = &r.route_name {
                    m.entry(n.as_bytes().into()).or_insert(r.policy);
                }
            }
            m
        });
        RouteTable { rules, by_name, unnamed, names_only }
    }

    /// The policy of the route named `route_name`, when [`RouteTable::names_only`] (otherwise
    /// None for every name: use [`RouteTable::find`]).
    pub fn by_route_name(&self, route_name: &[u8]) -> Option<usize> {
        self.names_only.as_ref()?.get(route_name).copied()
    }

    /// Whether [`RouteTable::by_route_name`] decides every request.
    pub fn names_only(&self) -> bool {
        self.names_only.is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Route] {
        &self.rules
    }

    /// The policy index of the first rule that matches, if any.
    pub fn find(&self, a: &mut impl Attributes) -> Option<usize> {
        let named: &[u32] = if self.by_name.is_empty() {
            &[]
        } else {
            a.route_name()
                .and_then(|n| core::str::from_utf8(n).ok())
                .and_then(|n| self.by_name.get(n))
                .map_or(&[], |v| v.as_slice())
        };
        // Merge the two ascending lists so that rule order decides, as written.
        let (mut i, mut j) = (0, 0);
        loop {
            let next = match (named.get(i), self.unnamed.get(j)) {
                (Some(&x), Some(&y)) if x < y => {
                    i += 1;
                    x
                }
                (_, Some(&y)) => {
                    j += 1;
                    y
                }
                (Some(&x), None) => {
                    i += 1;
                    x
                }
                (None, None) => return None,
            };
            if let Some(rule) = self.rules.get(next as usize) {
                if rule_matches(rule, a) {
                    return Some(rule.policy);
                }
            }
        }
    }
}

/// The route_name condition is settled by the index; the others are checked here.
fn rule_matches(r: &Route, a: &mut impl Attributes) -> bool {
    if let Some(prefix) = &r.path_prefix {
        if !a.path().is_some_and(|p| p.starts_with(prefix.as_bytes())) {
            return false;
        }
    }
    if !r.methods.is_empty() && !a.method().is_some_and(|m| r.methods.iter().any(|x| x.as_bytes() == m)) {
        return false;
    }
    if let Some(h) = &r.host {
        if !a.host().is_some_and(|host| h.matches(host)) {
            return false;
        }
    }
    for (name, value) in &r.headers {
        if a.header(name).as_deref() != Some(value.as_bytes()) {
            return false;
        }
    }
    if let Some(c) = &r.cluster {
        if a.cluster() != Some(c.as_bytes()) {
            return false;
        }
    }
    true
}
