//! The `linescan` command line.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use linescan::config::{ModelArgs, ServeArgs};

#[derive(Parser)]
#[command(
    name = "linescan",
    version,
    about = "Inspection server for factories: PCB AOI, fleet sensor scoring and ONNX model serving with dynamic batching",
    after_help = "Every flag can also be set by the environment variable its help names. Three \
        variables have no flag:\n\
        - LINESCAN_LOG: the log level (info by default; debug, warn, ...) or a filter such as \
        linescan=debug\n\
        - LINESCAN_ORT_LIB (or ORT_DYLIB_PATH): the ONNX Runtime library; otherwise taken \
        from .venv, a lib/ folder beside the executable, or python3's onnxruntime package\n\
        - LINESCAN_CUDA_DEVICE: the GPU of --preprocess cuda (0 by default)"
)]
struct Cli {
    /// Log format: text for people, json (one object per line) for log collectors. The level
    /// is LINESCAN_LOG's (`linescan --help`).
    #[arg(
        long,
        env = "LINESCAN_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model repository over HTTP (Open Inference Protocol, /metrics).
    Serve(ServeArgs),
    /// Inspect the model repository.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// PCB inspection on DeepPCB-format folders: detect and evaluate.
    #[command(subcommand)]
    Aoi(linescan::cli::aoi::AoiCommand),
    /// Fleet jobs offline: score an HDF5 archive (optionally one shard), merge shards, write a
    /// synthetic archive.
    #[command(subcommand)]
    Job(linescan::cli::sensors::JobCommand),
    /// Remaining useful life from C-MAPSS text files.
    #[command(subcommand)]
    Rul(linescan::cli::sensors::RulCommand),
    /// Benchmarks: load generator against a server, and in-process baselines.
    #[command(subcommand)]
    Bench(linescan::bench::BenchCommand),
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// List models, versions, inputs and outputs as configured.
    List(ModelArgs),
    /// Load every model (sessions, providers, warm-up) and report what would serve.
    Check(ModelArgs),
}

fn main() -> ExitCode {
    // Mesa's Vulkan device-select layer probes for a Wayland/X display when wgpu enumerates
    // adapters and prints an alarming "XDG_RUNTIME_DIR is invalid" on headless servers; wgpu
    // picks the adapter itself, so the layer is not needed.
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
    let matches = command_line().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    if !matches!(cli.command, Command::Serve(_)) {
        die_quietly_on_closed_stdout();
    }
    init_logging(cli.log_format);
    let outcome = match cli.command {
        Command::Serve(args) => {
            actix_web::rt::System::new().block_on(linescan::server::serve(args))
        }
        Command::Models(ModelsCommand::List(args)) => linescan::cli::models::list(&args),
        Command::Models(ModelsCommand::Check(args)) => linescan::cli::models::check(&args),
        Command::Aoi(command) => linescan::cli::aoi::run(command),
        Command::Job(command) => linescan::cli::sensors::run_job(command),
        Command::Rul(command) => linescan::cli::sensors::run_rul(command),
        Command::Bench(command) => linescan::bench::run(command),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<linescan::signals::Interrupted>() => {
            match cli.log_format {
                LogFormat::Text => eprintln!("{error}"),
                LogFormat::Json => tracing::warn!(reason = error.to_string(), "exiting"),
            }
            ExitCode::from(linescan::signals::EXIT_INTERRUPTED)
        }
        Err(error) => {
            match cli.log_format {
                LogFormat::Text => eprintln!("error: {error:#}"),
                // A log collector reading JSON lines gets the fatal error as one of them.
                LogFormat::Json => tracing::error!(error = format!("{error:#}"), "exiting"),
            }
            ExitCode::FAILURE
        }
    }
}

/// The command line as parsed: the derived commands, with negative values let through.
fn command_line() -> clap::Command {
    negative_values_reach_the_checks(Cli::command())
}

/// Lets a negative value reach its flag's own check ("--port -1": "-1 is not in 0..=65535",
/// "--risk-critical -5": "must be a number of 0 or more") rather than clap's "unexpected
/// argument '-1' found", on every command.
fn negative_values_reach_the_checks(command: clap::Command) -> clap::Command {
    command
        .mut_args(|arg| {
            let takes_values = arg.get_action().takes_values();
            arg.allow_negative_numbers(takes_values)
        })
        .mut_subcommands(negative_values_reach_the_checks)
}

/// Rust ignores SIGPIPE, so a summary printed into a closed pipe (`linescan models check |
/// head -1`) panicked. The offline commands write their files before their summaries and take
/// the usual Unix exit instead; the server keeps ignoring it, as its clients' sockets need.
fn die_quietly_on_closed_stdout() {
    // SAFETY: no other thread exists yet, and SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// Log levels when `LINESCAN_LOG` is unset.
const DEFAULT_LOG: &str = "info";

/// Libraries kept at warn unless `LINESCAN_LOG` names them: ONNX Runtime's graph optimiser is
/// chatty at info, and wgpu's shader compiler writes thousands of lines at debug.
const CHATTY: [&str; 4] = ["ort", "naga", "wgpu_core", "wgpu_hal"];

/// The filter from `LINESCAN_LOG` (the chatty libraries kept at warn unless named), or why the
/// value is not a filter a user meant.
fn log_filter(value: Option<&str>) -> Result<tracing_subscriber::EnvFilter, String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let value = value.unwrap_or(DEFAULT_LOG);
    if value.trim().is_empty() {
        // EnvFilter would take it as no directive at all, and log nothing, errors included.
        return Err("it is empty".into());
    }
    // A bare word is a target to EnvFilter: "warnn" would silence every other line.
    let stray = value.split(',').map(str::trim).find(|d| {
        !d.is_empty() && !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str())
    });
    if let Some(word) = stray {
        return Err(format!("{word:?} is not a level"));
    }
    // The targets the value names (`target[span]=level`), to tell `ort` from `linescan::report`.
    let targets: Vec<&str> = value
        .split(',')
        .filter_map(|d| d.split_once('='))
        .map(|(target, _)| target.split('[').next().unwrap_or_default().trim())
        .collect();
    let named = |library: &str| {
        targets.iter().any(|target| {
            target
                .strip_prefix(library)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
    };
    let mut directives = value.to_string();
    for library in CHATTY.iter().filter(|library| !named(library)) {
        directives.push_str(&format!(",{library}=warn"));
    }
    tracing_subscriber::EnvFilter::try_new(directives).map_err(|e| e.to_string())
}

fn init_logging(format: LogFormat) {
    let value = std::env::var("LINESCAN_LOG").ok();
    let filter = log_filter(value.as_deref()).unwrap_or_else(|problem| {
        eprintln!(
            "warning: LINESCAN_LOG={:?} ignored ({problem}; use a level such as info or debug, \
             or target=level pairs such as linescan=debug); logging at {DEFAULT_LOG}",
            value.as_deref().unwrap_or_default()
        );
        log_filter(None).expect("the default filter is valid")
    });
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only on a terminal: files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines.json().boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(linescan::log_limit::LibraryErrorLimit::new("actix_http"))
        .with(lines)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command's flags, by command path, with the variable each reads.
    fn flags(
        command: &clap::Command,
        path: &str,
        into: &mut Vec<(String, String, Option<String>)>,
    ) {
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.is_positional() || id == "help" || id == "version" {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            into.push((path.to_string(), id.to_string(), env));
        }
        for sub in command.get_subcommands() {
            flags(sub, &format!("{path} {}", sub.get_name()), into);
        }
    }

    #[test]
    fn every_flag_is_also_an_environment_variable() {
        let command = command_line();
        command.clone().debug_assert();
        let mut all = Vec::new();
        flags(&command, "linescan", &mut all);
        let without: Vec<_> = all
            .iter()
            .filter(|(_, _, env)| env.is_none())
            .map(|(path, id, _)| format!("{path} --{id}"))
            .collect();
        assert!(without.is_empty(), "flags without a variable: {without:?}");
        // Within one command a variable sets one flag.
        let mut seen = std::collections::HashSet::new();
        for (path, _, env) in &all {
            assert!(seen.insert((path, env)), "{path}: {env:?} sets two flags");
        }
        assert!(all.len() > 100, "{} flags", all.len());
        // An on/off flag can also be turned off, so the command line wins over a variable.
        for quiet in ["--quiet", "--quiet=true", "--quiet=false", "--quiet=no"] {
            let args = ["linescan", "job", "run", "a.h5", "--out", "r.csv", quiet];
            assert!(Cli::try_parse_from(args).is_ok(), "{quiet}");
        }
        assert!(Cli::try_parse_from(["linescan", "job", "run", "a.h5", "--quiet=maybe"]).is_err());
    }

    #[test]
    fn negative_values_are_judged_by_the_flag_that_takes_them() {
        let refusal = |args: &[&str]| {
            let error = command_line()
                .try_get_matches_from(args)
                .expect_err("refused");
            (error.kind(), error.to_string())
        };
        let (kind, text) = refusal(&["linescan", "serve", "--port", "-1"]);
        assert_eq!(kind, clap::error::ErrorKind::ValueValidation, "{text}");
        assert!(text.contains("--port"), "{text}");
        let (kind, text) = refusal(&["linescan", "serve", "--risk-critical", "-5"]);
        assert_eq!(kind, clap::error::ErrorKind::ValueValidation, "{text}");
        assert!(text.contains("0 or more"), "{text}");
        let (kind, text) = refusal(&["linescan", "bench", "infer", "--concurrency", "-4"]);
        assert_eq!(kind, clap::error::ErrorKind::ValueValidation, "{text}");
        // A flag-like word that is no number is still an unknown argument.
        let (kind, text) = refusal(&["linescan", "serve", "--port", "--nope"]);
        assert_ne!(kind, clap::error::ErrorKind::ValueValidation, "{text}");
    }

    #[test]
    fn log_filters_refuse_what_would_silence_the_log() {
        for good in [
            None,
            Some("info"),
            Some("linescan=debug,warn"),
            Some("info,ort=info"),
        ] {
            assert!(log_filter(good).is_ok(), "{good:?}");
        }
        assert!(
            log_filter(Some("warnn"))
                .unwrap_err()
                .contains("\"warnn\" is not a level")
        );
        assert!(log_filter(Some("x=[")).is_err());
        assert!(log_filter(Some("")).unwrap_err().contains("empty"));
        // A target that merely contains a library's name does not name it.
        let filter = log_filter(Some("info,linescan::bench::report=debug"))
            .unwrap()
            .to_string();
        assert!(filter.contains("ort=warn"), "{filter}");
        let filter = log_filter(Some("info,ort::logging=info"))
            .unwrap()
            .to_string();
        assert!(!filter.contains("ort=warn"), "{filter}");
        // The chatty libraries stay at warn unless asked for.
        let filter = log_filter(Some("debug")).unwrap().to_string();
        for library in CHATTY {
            assert!(filter.contains(&format!("{library}=warn")), "{filter}");
        }
        let filter = log_filter(Some("debug,naga=debug")).unwrap().to_string();
        assert!(
            filter.contains("naga=debug") && !filter.contains("naga=warn"),
            "{filter}"
        );
    }
}
