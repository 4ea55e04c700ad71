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
use tracing::{debug, info, warn};

use failover::driver::{Failover, FailoverSpec, GroupSpec};
use failover::heartbeat::{heartbeat_key, HeartbeatSpec, Heartbeats};
use failover::hooks::HookSpec;
use nbd_server::ListenAddr;

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
    /// Extra NBD data-plane threads per export [default: 0]. With 0, a volume's NBD
    /// connections run on the volume's own thread, next to its replication link, so a mirrored
    /// write never waits for a wake-up from another thread (lowest latency; one core per
    /// volume). With N, connections are spread over N threads: more throughput for many
    /// clients of one volume on a large machine, at the cost of a thread hop per write.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=1024))]
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
    /// Microseconds a volume's thread polls before it sleeps while it serves the peer's
    /// mirrored writes one at a time, as a secondary under a queue-depth-1 client does (0:
    /// never). The next write reaches a secondary only after the primary answered its client
    /// and read the client's next request, a longer wait than the primary's: a short poll
    /// mostly ends just before it arrives. Costs the secondary's CPU while such writes keep
    /// coming, none when they stop; bursts of writes get the --spin-us poll. Default: 200, or
    /// 0 with --spin-us 0 (no polling at all).
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u64).range(0..=10_000))]
    replica_spin_us: Option<u64>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = config::load(&args.config)?;
    nbd_server::spin::set_budget(args.spin_us);
    nbd_server::spin::set_replica_budget(args.replica_spin_us.unwrap_or(if args.spin_us == 0 {
        0
    } else {
        nbd_server::spin::DEFAULT_REPLICA_SPIN_US
    }));
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

/// Binds (and releases) every address this node listens on, before it contacts anyone: an
/// address that is not on this host (e.g. a lab config run outside its namespaces) stops the
/// daemon with a clear error before a single packet leaves.
fn precheck_addresses(cfg: &NodeConfig) -> anyhow::Result<()> {
    let not_here = |what: &str, addr: &str, e: std::io::Error| {
        let why = match e.kind() {
            std::io::ErrorKind::AddrNotAvailable => "it is not an address of this host".to_string(),
            std::io::ErrorKind::AddrInUse => "the address is already in use".to_string(),
            _ => e.to_string(),
        };
        anyhow::anyhow!("cannot listen for {what} on {addr}: {why}")
    };
    std::net::TcpListener::bind(&cfg.replication_listen)
        .map_err(|e| not_here("replication", &cfg.replication_listen, e))?;
    if let Some(hb) = &cfg.heartbeat {
        for (listen, _) in &hb.links {
            std::net::UdpSocket::bind(listen).map_err(|e| not_here("heartbeats", listen, e))?;
        }
    }
    for v in &cfg.volumes {
        for l in &v.listen {
            if let ListenAddr::Tcp(a) = l {
                // Only whether the address is local: the port may be taken by the peer's
                // export on a one-machine pair until this node is promoted.
                if let Ok(sa) = a.parse::<std::net::SocketAddr>() {
                    let probe = std::net::SocketAddr::new(sa.ip(), 0);
                    std::net::TcpListener::bind(probe)
                        .map_err(|e| not_here(&format!("volume {}", v.name), a, e))?;
                }
            }
        }
    }
    Ok(())
}

fn nbd_uri(volume: &str, listen: &[ListenAddr]) -> String {
    match listen.first() {
        // A wildcard listen address is no address to connect to: the hooks get loopback.
        Some(ListenAddr::Tcp(a)) => match a.parse::<std::net::SocketAddr>() {
            Ok(sa) if sa.ip().is_unspecified() => {
                let lo: std::net::IpAddr = if sa.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                };
                format!(
                    "nbd://{}/{volume}",
                    std::net::SocketAddr::new(lo, sa.port())
                )
            }
            _ => format!("nbd://{a}/{volume}"),
        },
        Some(ListenAddr::Unix(p)) => format!("nbd+unix:///{volume}?socket={}", p.display()),
        None => String::new(),
    }
}

fn group_specs(cfg: &NodeConfig) -> Vec<GroupSpec> {
    let hook = |cmd: &Option<String>, h: &config::HooksConfig| {
        cmd.as_ref().map(|c| HookSpec {
            command: c.clone(),
            timeout: h.timeout,
        })
    };
    cfg.groups
        .iter()
        .map(|g| GroupSpec {
            name: g.name.clone(),
            volumes: g.volumes.clone(),
            exports: g
                .volumes
                .iter()
                .filter_map(|v| cfg.volumes.iter().find(|x| &x.name == v))
                .map(|v| (v.name.clone(), nbd_uri(&v.name, &v.listen)))
                .collect(),
            preferred_node: g.preferred_node.clone(),
            vip: g
                .vip
                .as_ref()
                .and_then(|(a, p, i)| failover::vip::Vip::new(*a, *p).ok().map(|v| (v, i.clone()))),
            auto_failback: g.auto_failback,
            start: hook(&g.hooks.start, &g.hooks),
            stop: hook(&g.hooks.stop, &g.hooks),
            monitor: hook(&g.hooks.monitor, &g.hooks),
            fence: hook(&g.hooks.fence, &g.hooks),
            monitor_interval: g.hooks.monitor_interval,
            restart_attempts: g.hooks.restart_attempts,
            fence_delay: g.hooks.fence_delay,
        })
        .collect()
}

/// Raises the soft limit on open files to the hard one: the default soft limit (1024) is
/// soon reached by NBD clients plus connections to the replication port (a stranger's
/// handshake holds a descriptor for up to 20 s), and once reached the real peer can no
/// longer connect.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        // An unlimited hard limit is not a value the kernel takes for open files (nr_open).
        Ok((soft, hard)) if soft < hard.min(1 << 20) => {
            let to = hard.min(1 << 20);
            match setrlimit(Resource::RLIMIT_NOFILE, to, hard) {
                Ok(()) => debug!(from = soft, to, "raised the open-file limit"),
                Err(e) => warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open-file limit"),
    }
}

async fn serve(cfg: NodeConfig, threads: Option<u16>) -> anyhow::Result<()> {
    precheck_addresses(&cfg)?;
    raise_open_file_limit();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.data_dir.display()))?;
    let control = bind_control(&cfg.control_socket)?;
    let engine: EngineKind = cfg.io_engine.parse().map_err(anyhow::Error::msg)?;
    let threads = threads.map(usize::from).unwrap_or(0);
    let spec = NodeSpec {
        node: cfg.node.clone(),
        secret: cfg.secret.0.clone(),
        replication_listen: cfg.replication_listen.clone(),
        peer: cfg.peer.clone(),
        peer_timeout: cfg.peer_timeout,
        peer_flush_interval: cfg.peer_flush_interval,
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
    let failover = match start_failover(&cfg, &node).await {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_file(&cfg.control_socket);
            return Err(e);
        }
    };
    info!(node = %cfg.node, control = %cfg.control_socket.display(), "control socket listening; daemon ready");
    let n2 = node.clone();
    let f2 = failover.clone();
    tokio::spawn(async move {
        loop {
            match control.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(handle_control(n2.clone(), f2.clone(), s));
                }
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    let signal = crate::export::wait_for_signal().await;
    if let Some(f) = &failover {
        info!(signal, "stopping: giving up this node's failover groups");
        f.shutdown().await;
    }
    info!(signal, "stopping: draining exports, flushing images");
    node.shutdown().await;
    let _ = std::fs::remove_file(&cfg.control_socket);
    info!("stopped cleanly");
    Ok(())
}

async fn start_failover(
    cfg: &NodeConfig,
    node: &Arc<Node>,
) -> anyhow::Result<Option<Arc<Failover>>> {
    let Some(hb) = &cfg.heartbeat else {
        return Ok(None);
    };
    let parse = |a: &str| -> anyhow::Result<std::net::SocketAddr> {
        a.parse()
            .with_context(|| format!("heartbeat address {a} must be IP:PORT"))
    };
    let mut links = Vec::new();
    for (l, p) in &hb.links {
        links.push((parse(l)?, parse(p)?));
    }
    let spec = HeartbeatSpec {
        node: cfg.node.clone(),
        peer: None,
        links,
        interval: hb.interval,
        timeout: hb.timeout,
        key: heartbeat_key(&cfg.secret.0),
    };
    let heartbeats = Heartbeats::start(spec)?;
    let witness = match &hb.witness {
        Some(w) => Some(parse(w)?),
        None => None,
    };
    let f = Failover::start(
        FailoverSpec {
            node: cfg.node.clone(),
            groups: group_specs(cfg),
            interval: hb.interval,
            timeout: hb.timeout,
            witness,
            witness_key: failover::witness::witness_key(&cfg.secret.0),
            state_dir: Some(cfg.data_dir.clone()),
        },
        node.clone(),
        heartbeats,
    )
    .await?;
    info!(groups = cfg.groups.len(), witness = ?hb.witness, "failover running");
    Ok(Some(f))
}

async fn handle_control(node: Arc<Node>, failover: Option<Arc<Failover>>, s: UnixStream) {
    let (rd, mut wr) = s.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd);
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(10), rd.read_line(&mut line)).await;
    let resp = match read {
        Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
            Ok(req) => execute(&node, failover.as_deref(), req).await,
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

async fn execute(
    node: &Arc<Node>,
    failover: Option<&Failover>,
    req: Request,
) -> Result<serde_json::Value, String> {
    let e = |e: mirror::node::NodeError| e.to_string();
    let manual = |volume: &str, force: bool| match failover {
        Some(f) => f
            .manual_role_change_allowed(volume, force)
            .map_err(|e| e.to_string()),
        None => Ok(()),
    };
    match req {
        Request::Status => {
            let mut v = serde_json::to_value(node.status()).map_err(|e| e.to_string())?;
            let groups = failover.map(|f| f.status()).unwrap_or_default();
            v["groups"] = serde_json::to_value(groups).map_err(|e| e.to_string())?;
            Ok(v)
        }
        Request::Swap { group, cancel } => {
            let f = failover.ok_or(
                "this node has no failover groups ([heartbeat] and [[group]] in its config)",
            )?;
            if cancel {
                info!(group, "operator: cancel swap");
                let outcome = f.cancel_swap(&group).map_err(|e| e.to_string())?;
                return Ok(serde_json::json!({
                    "group": group,
                    "action": outcome.message(),
                    "withdrawn": outcome == failover::driver::SwapCancel::Withdrawn,
                    "too_late": matches!(outcome, failover::driver::SwapCancel::TooLate(_)),
                }));
            }
            info!(group, "operator: swap");
            let action = f.request_swap(&group).map_err(|e| e.to_string())?;
            Ok(serde_json::json!({"group": group, "action": action}))
        }
        Request::Takeover { group } => {
            let f = failover.ok_or(
                "this node has no failover groups ([heartbeat] and [[group]] in its config)",
            )?;
            warn!(
                group,
                "operator: takeover (the operator says the peer is down)"
            );
            let action = f.request_takeover(&group).map_err(|e| e.to_string())?;
            Ok(serde_json::json!({"group": group, "action": action}))
        }
        Request::Promote { volume, force } => {
            manual(&volume, force)?;
            info!(volume, force, "operator: promote");
            let warning = node.promote(&volume, force).await.map_err(e)?;
            if let Some(w) = &warning {
                warn!(volume, "{w}");
            }
            Ok(serde_json::json!({"volume": volume, "role": "primary", "warning": warning}))
        }
        Request::Demote { volume, force } => {
            manual(&volume, force)?;
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
