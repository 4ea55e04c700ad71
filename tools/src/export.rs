//! `nbdmirror export`: serve one raw image over NBD, no mirroring.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use mirror::{create_image, EngineKind, ImageFile};
use nbd_server::{BlockBackend, Export, ExportInfo, ListenAddr};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::size::parse_size;

#[derive(Args, Debug)]
#[command(
    about = "Serve one raw image over NBD (no mirroring)",
    long_about = "Serve one raw image file over NBD until SIGINT or SIGTERM, then finish the \
                  requests in flight, flush the image and exit.\n\n\
                  The export answers to its name and to the empty (default) name, so both \
                  nbd://127.0.0.1:10809/NAME and nbd://127.0.0.1:10809/ work.",
    after_help = "Examples:\n  \
        nbdmirror export --image vm1.img --create 20G\n  \
        nbdmirror export --image vm1.img --listen 0.0.0.0:10809 --listen unix:/run/vm1.sock\n  \
        qemu-img info nbd://127.0.0.1:10809/vm1"
)]
pub struct ExportArgs {
    /// Raw image file (or block device) to serve.
    #[arg(long, value_name = "PATH")]
    image: PathBuf,
    /// Export name clients ask for [default: the image's file stem].
    #[arg(long)]
    name: Option<String>,
    /// Where to listen: HOST:PORT or unix:PATH; repeat for several.
    #[arg(
        long = "listen",
        value_name = "ADDR",
        default_value = "127.0.0.1:10809"
    )]
    listen: Vec<ListenAddr>,
    /// Refuse writes, trims and write-zeroes (EPERM).
    #[arg(long)]
    read_only: bool,
    /// Create a new sparse image of SIZE bytes (K/M/G/T binary suffixes, e.g. 256M) first;
    /// refuses to touch an existing file.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    create: Option<u64>,
    /// Disk I/O engine: io_uring, pread/pwrite (sync), or io_uring when available (auto).
    #[arg(long, value_name = "ENGINE", default_value = "auto", value_parser = ["auto", "uring", "sync"])]
    io_engine: String,
    /// Data-plane threads; each connection runs on one of them [default: number of CPUs].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Microseconds a data-plane thread polls its sockets before it sleeps (0: never).
    /// Waking a sleeping CPU costs more than serving a 4 KiB request, above all in a VM;
    /// polling briefly lets a queue-depth-1 client's next request, or the peer's answer, find
    /// the thread awake. At most this much CPU per sleep; a thread whose polls keep finding
    /// nothing stops polling until traffic returns, and one that has just waited for the disk
    /// to flush (FLUSH, FUA) does not poll for 1 ms (there, polling slowed the flushes).
    #[arg(long, value_name = "US", default_value_t = nbd_server::spin::DEFAULT_SPIN_US,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    spin_us: u64,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    if args.read_only && args.create.is_some() {
        anyhow::bail!("--create and --read-only together would serve an empty read-only image");
    }
    let engine: EngineKind = args.io_engine.parse().map_err(anyhow::Error::msg)?;
    nbd_server::spin::set_budget(args.spin_us);
    if let Some(size) = args.create {
        create_image(&args.image, size)?;
        info!(image = %args.image.display(), size, "created sparse image");
    }
    let name = match &args.name {
        Some(n) => n.clone(),
        None => args
            .image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into()),
    };
    // The control runtime (accept, signals) is single-threaded; connections run on the
    // data-plane shards that `serve` starts.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args, engine, name))
}

async fn serve(args: ExportArgs, engine: EngineKind, name: String) -> anyhow::Result<()> {
    let image = Arc::new(ImageFile::open(&args.image, args.read_only, engine)?);
    info!(image = %args.image.display(), size = image.size(), engine = image.engine_name(),
          read_only = args.read_only, "image opened");
    if image.size() == 0 {
        warn!(image = %args.image.display(), "image is empty (0 bytes)");
    }
    let listeners = nbd_server::bind_all(&args.listen).await?;
    let info = ExportInfo {
        name: name.clone(),
        description: format!("nbdmirror export of {}", args.image.display()),
        size: image.size(),
        base_flags: nbd_server::transmission_flags(args.read_only),
    };
    nbd_server::server::log_listening(&listeners, std::slice::from_ref(&info));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        let signal = wait_for_signal().await;
        info!(signal, "stopping: finishing requests in flight");
        let _ = stop_tx.send(true);
    });
    let exports = vec![Export {
        info,
        backend: image.clone(),
    }];
    let threads = args.threads.map(usize::from).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    info!(threads, "data-plane threads");
    nbd_server::serve(listeners, exports, stop_rx, threads).await;
    image
        .flush()
        .await
        .with_context(|| format!("final flush of {} failed", args.image.display()))?;
    info!("stopped; image flushed");
    Ok(())
}

pub async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only run until killed.
        std::future::pending::<()>().await;
        return "none";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
