//! `nbdmirror serve --config FILE`: the node daemon.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use mirror::node::{Node, NodeSpec};
use mirror::volume::{ResyncOptions, VolumeSpec};
use mirror::EngineKind;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::config::{self, NodeConfig};
use crate::control::Request;

#[derive(Args, Debug)]
#[command(
    about = "Run a node of a mirrored pair (the daemon)",
    long_about = "Run this node's daemon: open (creating when missing) each volume's image and \
        metadata, listen for the peer, keep every volume in sync with it, and export over NBD \
        the volumes this node is primary for. Every volume starts secondary: promote one node \
        with `nbdmirror promote VOLUME --config FILE`.\n\n\
        Runs in the foreground, logs to stderr; SIGINT or SIGTERM stop it cleanly.",
    after_help = "Example (a pair on one machine):\n  \
        nbdmirror serve --config examples/local-pair/node-b.toml &\n  \
        nbdmirror serve --config examples/local-pair/node-a.toml &\n  \
        nbdmirror promote disk0 --config examples/local-pair/node-a.toml\n  \
        qemu-img info nbd://127.0.0.1:10809/disk0"
)]
pub struct ServeArgs {
    /// The node's TOML config file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Data-plane threads of each NBD export [default: number of CPUs].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = config::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(cfg, args.threads))
}

/// Binds the control socket; a stale socket file left by a crash is replaced, a live
/// daemon's socket is not.
fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "control socket {}: the path exists and is not a socket",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "control socket {}: another daemon is running with this config",
                path.display()
            );
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot bind the control socket {}", path.display()))?;
    // Only the owner (root) may promote, demote or resolve.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(l)
}

async fn serve(cfg: NodeConfig, threads: Option<u16>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.data_dir.display()))?;
    let control = bind_control(&cfg.control_socket)?;
    let engine: EngineKind = cfg.io_engine.parse().map_err(anyhow::Error::msg)?;
    let threads = threads.map(usize::from).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let spec = NodeSpec {
        node: cfg.node.clone(),
        secret: cfg.secret.0.clone(),
        replication_listen: cfg.replication_listen.clone(),
        peer: cfg.peer.clone(),
        peer_timeout: cfg.peer_timeout,
        resync: ResyncOptions {
            rate: cfg.resync_rate,
            checksum: cfg.resync_checksum,
        },
        engine,
        threads,
        volumes: cfg
            .volumes
            .iter()
            .map(|v| {
                (
                    VolumeSpec {
                        name: v.name.clone(),
                        node: cfg.node.clone(),
                        image: v.image.clone(),
                        metadata: v.metadata.clone(),
                        size: v.size,
                        engine,
                    },
                    v.listen.clone(),
                )
            })
            .collect(),
    };
    let node = match Node::start(spec).await {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&cfg.control_socket);
            return Err(e.into());
        }
    };
    info!(node = %cfg.node, control = %cfg.control_socket.display(), "control socket listening; daemon ready");
    let n2 = node.clone();
    tokio::spawn(async move {
        loop {
            match control.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(handle_control(n2.clone(), s));
                }
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    let signal = crate::export::wait_for_signal().await;
    info!(signal, "stopping: draining exports, flushing images");
    node.shutdown().await;
    let _ = std::fs::remove_file(&cfg.control_socket);
    info!("stopped cleanly");
    Ok(())
}

async fn handle_control(node: Arc<Node>, s: UnixStream) {
    let (rd, mut wr) = s.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd);
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(10), rd.read_line(&mut line)).await;
    let resp = match read {
        Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
            Ok(req) => execute(&node, req).await,
            Err(e) => Err(format!("bad request: {e}")),
        },
        _ => return,
    };
    let v = match resp {
        Ok(result) => serde_json::json!({"ok": true, "result": result}),
        Err(error) => serde_json::json!({"ok": false, "error": error}),
    };
    let mut out = v.to_string();
    out.push('\n');
    let _ = wr.write_all(out.as_bytes()).await;
}

async fn execute(node: &Arc<Node>, req: Request) -> Result<serde_json::Value, String> {
    let e = |e: mirror::node::NodeError| e.to_string();
    match req {
        Request::Status => serde_json::to_value(node.status()).map_err(|e| e.to_string()),
        Request::Promote { volume, force } => {
            info!(volume, force, "operator: promote");
            let warning = node.promote(&volume, force).await.map_err(e)?;
            if let Some(w) = &warning {
                warn!(volume, "{w}");
            }
            Ok(serde_json::json!({"volume": volume, "role": "primary", "warning": warning}))
        }
        Request::Demote { volume } => {
            info!(volume, "operator: demote");
            node.demote(&volume).await.map_err(e)?;
            Ok(serde_json::json!({"volume": volume, "role": "secondary"}))
        }
        Request::Resolve {
            volume,
            discard_on,
            dry_run,
        } => {
            info!(volume, discard_on, dry_run, "operator: resolve split brain");
            let v = node.volume(&volume).map_err(e)?.clone();
            let bytes = v
                .resolve(&discard_on, dry_run)
                .await
                .map_err(|e| e.to_string())?;
            Ok(
                serde_json::json!({"volume": volume, "discard_on": discard_on, "dry_run": dry_run, "discarded_bytes": bytes}),
            )
        }
        Request::Verify { volume } => {
            info!(volume, "operator: verify");
            let v = node.volume(&volume).map_err(e)?.clone();
            let (compared, differing) = v.verify().await.map_err(|e| e.to_string())?;
            Ok(
                serde_json::json!({"volume": volume, "compared_bytes": compared, "differing_bytes": differing}),
            )
        }
    }
}
