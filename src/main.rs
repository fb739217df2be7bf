use clap::{Parser, Subcommand};
use mixserve::cli;
use tracing_subscriber::EnvFilter;

/// An inference server for sparse Mixture-of-Experts models (Mixtral, DBRX).
#[derive(Parser)]
#[command(name = "mixserve", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CPU threads for the model's work (default: RAYON_NUM_THREADS, else the physical cores)
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(cli::serve::ServeArgs),
    /// Generate from a prompt, or chat interactively on a terminal.
    Run(cli::run::RunArgs),
    /// Measure prefill and decode throughput against the memory-bandwidth roofline.
    Bench(cli::bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    let threads = mixserve::init_cpu_threads(args.threads.map(usize::from));
    // Logs go to stderr; `run` keeps quiet unless RUST_LOG asks, so stdout is just the answer.
    let default_level = match args.command {
        Command::Run(_) | Command::Bench(_) => "warn",
        Command::Serve(_) => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    tracing::info!(threads, "CPU threads");
    let result = match args.command {
        Command::Run(a) => cli::run::run(a),
        Command::Serve(a) => cli::serve::serve(a),
        Command::Bench(a) => cli::bench::bench(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
