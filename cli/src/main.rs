//! `payload-processor`: the filter's engine and built-in plugins, offline.
//!
//! - `validate CHAIN.yaml` loads a chain exactly as the filter does in Envoy and prints the
//!   same path-qualified error Envoy would log.
//! - `run CHAIN.yaml --request REQ.json` runs the chain on an in-memory host and shows what each
//!   processor did.
//! - `schema` prints the JSON Schema of a chain configuration.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod run;

use clap::{Parser, Subcommand, ValueEnum};
use payload_processor_core::Chain;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Validate, run and describe envoy-payload-processor chain configurations offline.
///
/// The same engine and plugins as the Envoy filter: a chain `validate` accepts loads in Envoy,
/// and one it refuses fails in Envoy with the same message.
#[derive(Parser, Debug)]
#[command(name = "payload-processor", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load a chain configuration (YAML or JSON) as the filter does; exit 0 when valid, 1 with
    /// the path-qualified error Envoy would log otherwise.
    Validate {
        /// The chain configuration file (`-` for standard input).
        chain: PathBuf,
        /// The form the chain will run in: the `.wasm` cannot read files named in the config.
        #[arg(long, value_enum, default_value_t = Form::So)]
        form: Form,
    },
    /// Run a chain on one request (and optionally its response) and show, per processor, its
    /// decision, the headers it set, its body changes, its findings and its time.
    Run {
        /// The chain configuration file.
        chain: PathBuf,
        #[command(flatten)]
        options: run::Options,
        /// The form the chain will run in (see `validate`).
        #[arg(long, value_enum, default_value_t = Form::So)]
        form: Form,
    },
    /// Print the JSON Schema (draft 2020-12) of a chain configuration, every built-in plugin's
    /// parameters included.
    Schema,
}

/// Which build of the filter the chain is meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Form {
    /// The Envoy dynamic module (`libpayload_processor.so`): reads files named in the config.
    So,
    /// The proxy-wasm filter (`payload_processor.wasm`): no file system.
    Wasm,
}

fn main() -> ExitCode {
    log::set_logger(&STDERR_LOGGER).ok();
    log::set_max_level(log::LevelFilter::Warn);
    match execute(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("payload-processor: {message}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<(), String> {
    match command {
        Command::Validate { chain, form } => validate(&chain, form),
        Command::Run { chain, options, form } => {
            let loaded = load(&chain, form)?;
            options.run(loaded, &chain)
        }
        Command::Schema => {
            let schema = payload_processor_plugins::builtin_registry().chain_schema();
            let text = serde_json::to_string_pretty(&schema).map_err(|err| err.to_string())?;
            println!("{text}");
            Ok(())
        }
    }
}

fn validate(path: &Path, form: Form) -> Result<(), String> {
    let chain = load(path, form)?;
    let names: Vec<&str> = chain.processor_names().collect();
    println!(
        "{}: valid; {} processor{}: {}",
        path.display(),
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        names.join(", ")
    );
    Ok(())
}

/// Reads and loads a chain as the filter does (the same message on failure as Envoy's log).
fn load(path: &Path, form: Form) -> Result<Chain, String> {
    let text = read_text(path)?;
    if form == Form::So {
        // The same reader the `.so` installs, so file errors read the same.
        payload_processor_core::set_file_reader(|path| std::fs::read(path).map_err(|err| format!("{path}: {err}")));
    }
    Chain::load(&text, &payload_processor_plugins::builtin_registry())
        .map_err(|err| format!("{}: invalid configuration: {err}", path.display()))
}

pub(crate) fn read_text(path: &Path) -> Result<String, String> {
    let bytes = if path.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).map(|_| bytes)
    } else {
        std::fs::read(path)
    }
    .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    String::from_utf8(bytes).map_err(|err| format!("{} is not UTF-8: {err}", path.display()))
}

/// Warnings (deprecated spellings, plugin notes) go to standard error, as Envoy's log would
/// show them.
struct StderrLogger;
static STDERR_LOGGER: StderrLogger = StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("{}: {}", record.level().as_str().to_lowercase(), record.args());
        }
    }
    fn flush(&self) {}
}
