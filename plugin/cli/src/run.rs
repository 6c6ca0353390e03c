//! `simulate` and `access-log-format` as commands: files in, report out, with a progress bar on
//! a terminal while a long log is read and replayed.

use crate::simulate::{self, Reading};
use crate::{access_log, per_route, Output};
use breakwater::config::{self, Config};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Reads a plugin configuration (JSON, or YAML as kubectl reads it) with the plugin's parser.
pub fn read_config(path: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value = per_route::read(&text).map_err(|e| format!("{}: error: {e}", path.display()))?;
    if ["static_resources", "apiVersion", "resources"].iter().any(|k| value.get(k).is_some()) {
        return Err(format!(
            "{}: error: an Envoy or Kubernetes file, not a plugin configuration: give the plugin configuration itself \
             (a Wasm filter's configuration value, a WasmPlugin's pluginConfig, or e.g. envoy/demo-policies.yaml)",
            path.display()
        ));
    }
    config::parse(value.to_string().as_bytes()).map_err(|e| format!("{}: error: {e}", path.display()))
}

/// A bar on stderr, drawn only when stderr is a terminal (indicatif hides it otherwise).
fn bar(len: Option<u64>, what: &str) -> ProgressBar {
    let (bar, template) = match len {
        Some(n) => (ProgressBar::new(n), "{msg} [{bar:30}] {percent}% {binary_bytes_per_sec} eta {eta}"),
        None => (ProgressBar::new_spinner(), "{msg} {spinner} {binary_bytes}"),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Reads `input` line by line into `reading`.
fn read_log(
    config: &Config,
    reading: &mut Reading,
    name: &str,
    input: Box<dyn Read>,
    len: Option<u64>,
) -> std::io::Result<()> {
    let file = reading.file(name);
    let progress = bar(len, &format!("reading {name}"));
    let mut input = BufReader::with_capacity(1 << 20, progress.wrap_read(input));
    let mut buf = Vec::new();
    let mut number = 0u64;
    loop {
        buf.clear();
        if input.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        number += 1;
        match std::str::from_utf8(&buf) {
            Ok(text) => reading.line(config, file, number, text),
            Err(e) => reading.bad(file, number, format!("not UTF-8: {e}")),
        }
    }
    progress.finish_and_clear();
    Ok(())
}

pub fn simulate(config_path: &Path, logs: &[PathBuf], output: Output, svg: Option<PathBuf>) -> ExitCode {
    let config = match read_config(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut reading = Reading::new();
    for log in logs {
        let name = log.display().to_string();
        let opened: std::io::Result<(Box<dyn Read>, Option<u64>)> = if name == "-" {
            Ok((Box::new(std::io::stdin()), None))
        } else {
            std::fs::File::open(log).map(|f| {
                let len = f.metadata().ok().map(|m| m.len());
                (Box::new(f) as Box<dyn Read>, len)
            })
        };
        if let Err(e) = opened.and_then(|(input, len)| read_log(&config, &mut reading, &name, input, len)) {
            eprintln!("{name}: {e}");
            return ExitCode::FAILURE;
        }
    }
    if reading.lines > 0 && reading.lines == reading.malformed {
        let first =
            reading.malformed_shown.first().map(|m| format!(" (line {}: {})", m.line, m.error)).unwrap_or_default();
        eprintln!(
            "error: no line of the log could be read{first}: is it the JSON access log of `breakwater access-log-format`?"
        );
        return ExitCode::FAILURE;
    }
    // Envoy writes a line when a stream ends: replay them in the order they started.
    reading.requests.sort_by_key(|r| (r.start, r.file, r.line));
    let progress = bar(Some(reading.requests.len() as u64), "simulating");
    progress.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} requests eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = simulate::replay(&config, &reading, &mut |done| progress.set_position(done));
    progress.finish_and_clear();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default()),
        Output::Text => print!("{}", simulate::text::render(&report)),
    }
    if let Some(path) = svg {
        if let Err(e) = std::fs::write(&path, simulate::svg::render(&report)) {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

pub fn access_log_format(config: Option<&Path>, path: &str, output: Output) -> ExitCode {
    let headers = match config.map(read_config) {
        None => Vec::new(),
        Some(Ok(c)) => access_log::headers_read(&c),
        Some(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "access_log": [access_log::entry(path, &headers)] }))
                .unwrap_or_default()
        ),
        Output::Text => print!("{}", access_log::to_yaml(path, &headers)),
    }
    ExitCode::SUCCESS
}
