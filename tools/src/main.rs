//! `nbdmirror`: the daemon and the operator's tools in one binary.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bitmap;
mod config;
mod control;
mod export;
mod serve;
mod size;
mod witness;

#[derive(Parser)]
#[command(
    name = "nbdmirror",
    version,
    about = "Highly available VM disks on two servers: NBD exports mirrored synchronously",
    long_about = "nbdmirror serves raw disk images over the Network Block Device protocol \
                  (QEMU, libvirt, nbd-client, libnbd tools attach them like local disks).\n\n\
                  A node runs `nbdmirror serve --config node.toml`; the other commands talk to it \
                  (status, promote, demote, resolve, verify). `nbdmirror export` serves one image \
                  without mirroring; `nbdmirror bitmap inspect` reads a metadata file offline."
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive such as
    /// `nbd_server=debug`). RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Serve(serve::ServeArgs),
    Status(control::StatusArgs),
    Promote(control::PromoteArgs),
    Demote(control::DemoteArgs),
    Resolve(control::ResolveArgs),
    Swap(control::SwapArgs),
    Takeover(control::TakeoverArgs),
    Verify(control::VerifyArgs),
    Export(export::ExportArgs),
    /// Inspect a volume's metadata file (dirty map, activity map, generations).
    Bitmap(bitmap::BitmapArgs),
    Witness(witness::WitnessArgs),
}

fn init_logging(level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// glibc's malloc gives a freed buffer of a large request (1 MiB and up) back to the kernel,
/// so the next request of that size page-faults and zeroes it again: a quarter of the primary's
/// CPU samples in mirrored 1 MiB writes (perf). mimalloc keeps such memory for reuse: CPU per
/// mirrored MiB 1,400 -> 800 us, throughput about 2x (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Status(args) => control::status(args),
        Command::Promote(args) => control::promote(args),
        Command::Demote(args) => control::demote(args),
        Command::Resolve(args) => control::resolve(args),
        Command::Swap(args) => control::swap(args),
        Command::Takeover(args) => control::takeover(args),
        // Like cmp(1): 0 identical, 1 different, 2 could not compare.
        Command::Verify(args) => match control::verify(args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {}", error_text(&e));
                return ExitCode::from(2);
            }
        },
        Command::Export(args) => export::run(args),
        Command::Bitmap(args) => bitmap::run(args),
        Command::Witness(args) => witness::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once. Most of our errors already put
/// their source into their own message ("cannot create image X: {source}") and also return
/// it as `source()`, so anyhow's `{:#}` printed the same cause two or three times: a cause
/// whose text is already on the line is left out (nothing is lost: it is there verbatim).
fn error_text(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("cannot create image /x/disk0.img: {0}")]
        Create(#[source] std::io::Error),
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("volume disk0: {0}")]
        Volume(#[source] Inner),
    }

    fn enoent() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::NotFound)
    }

    #[test]
    fn each_cause_is_printed_once() {
        let e = anyhow::Error::new(Outer::Volume(Inner::Create(enoent())));
        let io = enoent().to_string();
        let line = error_text(&e);
        assert_eq!(
            line,
            format!("volume disk0: cannot create image /x/disk0.img: {io}")
        );
        assert_eq!(line.matches(&io).count(), 1, "{line}");
    }

    #[test]
    fn causes_not_in_the_message_are_kept() {
        let e = anyhow::Error::new(enoent()).context("reading the config");
        assert_eq!(error_text(&e), format!("reading the config: {}", enoent()));
        let e = anyhow::anyhow!("plain");
        assert_eq!(error_text(&e), "plain");
    }
}
