//! `breakwater`: the operator's command line for the Breakwater proxy-wasm filter.
//!
//! It links the plugin crate and checks configurations with the plugin's own parser, so it
//! accepts exactly what Envoy would accept.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

mod access_log;
mod per_route;
mod run;
mod simulate;
mod status;
mod validate;
mod yaml;

use clap::{Parser, Subcommand, ValueEnum};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use validate::{FileReport, Finding, Found, Options};

/// The JSON Schema (draft 2020-12) of the plugin configuration.
const SCHEMA: &str = include_str!("../breakwater.schema.json");

#[derive(Parser)]
#[command(
    name = "breakwater",
    version,
    about = "Operate Breakwater: check its configurations, print their schema, split them into per-route filters, \
             replay yesterday's traffic through a policy, read and steer a running Envoy's policies."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check Breakwater configurations with the plugin's own parser, as Envoy would.
    ///
    /// Each FILE may be a plugin configuration (JSON or YAML), an Envoy bootstrap, LDS or ECDS
    /// file (every Breakwater Wasm filter in it is checked), or an Istio WasmPlugin manifest (its
    /// spec.pluginConfig). YAML is read as kubectl reads it (YAML 1.1: a bare on/off/yes/no/y/n is a
    /// boolean), with a warning where YAML 1.2 tools would read it otherwise. Exits with 1 if
    /// any configuration is invalid or a file holds none, 0 if all are valid.
    Validate {
        /// Files to check; `-` reads standard input.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// `text` for people (file:line:column: …), `json` for scripts.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Check every Wasm filter and WasmPlugin, not only those whose name, root id, VM id or
        /// code mentions "breakwater".
        #[arg(long)]
        any_wasm: bool,
    },
    /// Print the JSON Schema (draft 2020-12) of the plugin configuration, for editors and policy
    /// checkers. Its $comment lists the rules a schema cannot express; `validate` checks them all.
    Schema,
    /// Print the per-route filter instances for plain Envoy made from a route-rule
    /// configuration: one disabled Breakwater filter per policy (for `http_filters`) and the
    /// `typed_per_filter_config` that enables it on each route its rules name. Only rules that
    /// match on `route_name` alone can become per-route instances.
    PerRoute {
        /// The plugin configuration (JSON or YAML) with `policies` and `routes`.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The .wasm path (or URL-less file) the filters' vm_config loads.
        #[arg(long, default_value = "breakwater.wasm")]
        wasm: String,
        /// The filters' failure_policy (see the README's "Failure modes").
        #[arg(long, default_value = "FAIL_RELOAD")]
        failure_policy: String,
        /// The filters' vm_id: every instance shares one VM per worker, and its state.
        #[arg(long, default_value = "breakwater")]
        vm_id: String,
        /// `text` (YAML to paste), `json` for scripts.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print what each policy of a running Envoy is doing: breaker state, window counts and
    /// rates, open time left, probes; bulkhead permits and queue; retry budget left. Read from
    /// the status and control endpoint (a Breakwater filter instance with `control`).
    Status {
        /// Only this policy.
        #[arg(value_name = "POLICY")]
        policy: Option<String>,
        #[command(flatten)]
        endpoint: EndpointArgs,
        /// `text` for people, `json` (the endpoint's own answer) for scripts.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Force a policy's breaker open or closed, release it to automatic, or reset it, on every
    /// worker at once (the endpoint needs `control.writes: true`). The state is shared data: it
    /// survives configuration reloads, not an Envoy restart.
    Control {
        #[arg(value_name = "POLICY")]
        policy: String,
        #[arg(value_enum, value_name = "COMMAND")]
        command: ControlCommand,
        #[command(flatten)]
        endpoint: EndpointArgs,
        /// `text` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Replay an Envoy access log through the policies' own state machines and report what
    /// they would have done: when each breaker would have opened and closed and why, the
    /// requests it would have refused, bulkhead peaks and refusals, the retries the budget would
    /// have allowed and denied.
    ///
    /// The log is the JSON one `breakwater access-log-format` configures Envoy to write (one
    /// object per request). Each request is routed by the configuration's own rules, admitted
    /// at its start time by the breaker, the bulkhead and the retry budget, and accounted for
    /// when it ends, exactly as the plugin does; its outcome is judged by the plugin's own
    /// rules. Lines are sorted by start time; malformed ones are counted and skipped. Requests
    /// the live plugin refused (their `breakwater` field) never reached the upstream: if the
    /// simulation admits one, its outcome is unknown and is not recorded. One state per policy
    /// stands for what Envoy's workers share: see the README's "The breakwater CLI" for what can
    /// differ from the live plugin. Exits with 1 if the configuration or a log cannot be read,
    /// or no line of the log could be.
    Simulate {
        /// The plugin configuration (JSON or YAML), with `routes` (or `policy`, which then
        /// applies to every logged request).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The access log; give it more than once for rotated files of one Envoy; `-` reads
        /// standard input (`zcat access.log.gz | breakwater simulate … --access-log -`).
        #[arg(long = "access-log", value_name = "LOG", required = true)]
        access_log: Vec<PathBuf>,
        /// `text` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Also write the timeline as SVG: each breaker's state over time, requests and
        /// refusals, the bulkhead's peak in flight.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Print the Envoy access log configuration that `simulate` reads: an `access_log` entry
    /// for the HTTP connection manager that runs Breakwater. With `--config`, it also logs the
    /// request headers that configuration reads (priority classes, rules on headers).
    AccessLogFormat {
        /// A plugin configuration (JSON or YAML) whose request headers to log.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Where Envoy writes the log.
        #[arg(long, default_value = access_log::DEFAULT_PATH)]
        path: String,
        /// `text` (YAML to paste), `json` for scripts.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// Where the status and control endpoint listens.
#[derive(clap::Args)]
struct EndpointArgs {
    /// The control listener's address.
    #[arg(long, default_value = "127.0.0.1:9902")]
    control: String,
    /// The endpoint's `control.path_prefix`.
    #[arg(long, default_value = "/breakwater")]
    prefix: String,
}

impl EndpointArgs {
    fn endpoint(self) -> status::Endpoint {
        status::Endpoint { address: self.control, prefix: self.prefix }
    }
}

/// What `breakwater control` does to a breaker.
#[derive(Clone, Copy, ValueEnum)]
enum ControlCommand {
    /// Refuse every call until released (resilience4j FORCED_OPEN, Polly Isolate).
    ForceOpen,
    /// Let every call through and record nothing until released (resilience4j DISABLED).
    ForceClosed,
    /// Back to automatic: a fresh closed breaker.
    Release,
    /// A fresh closed breaker, its counts cleared, not forced.
    Reset,
}

impl ControlCommand {
    fn path(self) -> &'static str {
        match self {
            ControlCommand::ForceOpen => "force_open",
            ControlCommand::ForceClosed => "force_closed",
            ControlCommand::Release => "release",
            ControlCommand::Reset => "reset",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    // SAFETY: restores the default action of one signal before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match Cli::parse().command {
        Command::Status { policy, endpoint, output } => {
            let endpoint = endpoint.endpoint();
            match endpoint.status(policy.as_deref()) {
                Ok(v) => {
                    match output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
                        Output::Text => print!("{}", status::to_text(&v)),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Control { policy, command, endpoint, output } => {
            let endpoint = endpoint.endpoint();
            match endpoint.command(&policy, command.path()) {
                Ok(v) => {
                    match output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
                        Output::Text => {
                            for c in v.get("changed").and_then(serde_json::Value::as_array).into_iter().flatten() {
                                println!(
                                    "{policy}: {} -> {}",
                                    c["before"].as_str().unwrap_or("?"),
                                    c["after"].as_str().unwrap_or("?")
                                );
                            }
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Schema => {
            print!("{SCHEMA}");
            ExitCode::SUCCESS
        }
        Command::PerRoute { file, wasm, failure_policy, vm_id, output } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            let opts = per_route::Options { wasm, failure_policy, vm_id };
            match per_route::read(&text).and_then(|c| per_route::instances(&c, &opts)) {
                Ok(out) => {
                    match output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default()),
                        Output::Text => print!("{}", per_route::to_yaml(&out)),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: error: {e}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Simulate { config, access_log, output, svg } => run::simulate(&config, &access_log, output, svg),
        Command::AccessLogFormat { config, path, output } => run::access_log_format(config.as_deref(), &path, output),
        Command::Validate { files, output, any_wasm } => {
            let opts = Options { any_wasm };
            let reports: Vec<FileReport> = files.iter().map(|f| check_file(f, &opts)).collect();
            // Files may hold other things too (a directory of manifests), but not nothing at all.
            let found = reports.iter().any(|r| !r.configs.is_empty());
            let valid = found && reports.iter().all(|r| r.valid);
            match output {
                Output::Json => {
                    let out = serde_json::json!({ "valid": valid, "configurations": reports.iter().map(|r| r.configs.len()).sum::<usize>(), "files": reports });
                    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
                }
                Output::Text => {
                    reports.iter().for_each(print_text);
                    if !found && reports.iter().all(|r| r.error.is_none()) {
                        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                        println!("error: no Breakwater configuration in {}", names.join(", "));
                    }
                }
            }
            if valid {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn check_file(path: &PathBuf, opts: &Options) -> FileReport {
    let name = path.display().to_string();
    let text = if name == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map(|_| s)
    } else {
        std::fs::read_to_string(path)
    };
    match text {
        Ok(text) => validate::validate_file(&name, &text, opts),
        Err(e) => FileReport {
            file: name,
            valid: false,
            error: Some(Finding { line: None, column: None, path: None, message: format!("cannot read: {e}") }),
            configs: Vec::new(),
            warnings: Vec::new(),
            skipped: Vec::new(),
        },
    }
}

/// "1 policy", "2 policies".
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `file:line:column`, as compilers print it, so editors and terminals can jump there.
fn place(file: &str, f: &Finding) -> String {
    match (f.line, f.column) {
        (Some(l), Some(c)) => format!("{file}:{l}:{c}"),
        _ => file.to_string(),
    }
}

fn message(f: &Finding) -> String {
    match f.path.as_deref() {
        Some(p) if !p.is_empty() => format!("{p}: {}", f.message),
        _ => f.message.clone(),
    }
}

fn describe(c: &Found) -> String {
    match c.kind {
        "envoy-wasm-filter" => format!("Wasm filter {:?} at {}", c.name, c.at),
        "istio-wasmplugin" => format!("WasmPlugin {} ({})", c.name, c.at),
        _ if c.name.is_empty() => "plugin configuration".to_string(),
        _ => format!("plugin configuration ({})", c.name),
    }
}

fn print_text(r: &FileReport) {
    if let Some(e) = &r.error {
        println!("{}: error: {}", place(&r.file, e), message(e));
    }
    for c in &r.configs {
        match &c.error {
            None => match (&c.policy, c.control_writes) {
                (_, Some(writes)) => println!(
                    "{}: ok: {} (the status and control endpoint, writes {})",
                    r.file,
                    describe(c),
                    if writes { "on" } else { "off" }
                ),
                (Some(p), None) => println!("{}: ok: {} (per-route instance of policy {p})", r.file, describe(c)),
                (None, None) => {
                    println!(
                        "{}: ok: {} ({}, {})",
                        r.file,
                        describe(c),
                        count(c.policies, "policy", "policies"),
                        count(c.routes, "route", "routes")
                    )
                }
            },
            Some(e) => println!("{}: error: {}\n    in {}", place(&r.file, e), message(e), describe(c)),
        }
    }
    for w in &r.warnings {
        println!("{}: warning: {}", place(&r.file, w), message(w));
    }
    for s in &r.skipped {
        println!("{}: skipped {s}", r.file);
    }
}
