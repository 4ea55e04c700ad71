//! `nbdmirror witness --config FILE`: the witness, a small third-node process that gives the
//! pair quorum (see `failover::witness` for the rules and the protocol).
//!
//! ```toml
//! listen = "10.99.0.10:7790"          # IP:PORT, an address of this host (UDP)
//! secret_file = "/etc/nbdmirror/secret"  # or: secret = "..." (the nodes' shared secret)
//! state_file = "witness-state.json"    # votes, kept across restarts
//! ```
//!
//! Relative paths are relative to the config file's folder. Parsing is pure ([`parse`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use failover::witness::{
    witness_key, VoteOutcome, WitnessClient, WitnessServer, WitnessServerSpec,
};
use serde::Deserialize;
use tracing::info;

use crate::config::{ConfigError, Secret};

#[derive(Args, Debug)]
#[command(
    about = "Run the witness: the third vote that lets a pair fail over safely",
    long_about = "Run the witness, a small process on a third machine (not node-a, not node-b) \
                  that votes for at most one primary per group and election round, and remembers \
                  its votes in its state file across restarts. A node promotes itself \
                  automatically only with quorum: the peer's consent, the witness's vote, or a \
                  successful fence hook. A primary that loses both its peer and the witness \
                  suspends I/O rather than risk two primaries.\n\n\
                  The witness answers on UDP at `listen`; requests and answers are authenticated \
                  with the nodes' shared secret (not encrypted). It binds its address first and \
                  exits with an error if that address is not one of this host's. It runs until \
                  SIGINT or SIGTERM; every vote is on disk (fsync'd) before it is answered.",
    after_help = "Config file (TOML; relative paths are relative to its folder):\n  \
        listen = \"10.99.0.10:7790\"\n  \
        secret_file = \"/etc/nbdmirror/secret\"   # or secret = \"...\", at least 16 characters\n  \
        state_file = \"witness-state.json\"\n\n\
        Example:\n  \
        nbdmirror witness --config /etc/nbdmirror/witness.toml\n\n\
        The nodes name it in their config: [heartbeat] witness = \"10.99.0.10:7790\"."
)]
pub struct WitnessArgs {
    /// The witness's config file (keys: listen, secret or secret_file, state_file).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    #[command(subcommand)]
    debug: Option<DebugCommand>,
}

/// Hidden tools for tests and troubleshooting: ask a running witness as a node would.
#[derive(Subcommand, Debug)]
enum DebugCommand {
    /// Ask the witness named by the config (its listen address and secret) one question and
    /// print the answer as JSON.
    #[command(hide = true)]
    Client(ClientArgs),
}

#[derive(Args, Debug)]
struct ClientArgs {
    /// The node name to ask as.
    #[arg(long)]
    node: String,
    /// Witness address [default: the config's listen address; 127.0.0.1 for 0.0.0.0].
    #[arg(long, value_name = "IP:PORT")]
    witness: Option<SocketAddr>,
    /// Deadline in milliseconds.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    #[command(subcommand)]
    op: ClientOp,
}

#[derive(Subcommand, Debug)]
enum ClientOp {
    Vote {
        group: String,
        round: u64,
        generation: u64,
    },
    Lease {
        group: String,
        round: u64,
    },
    Query {
        group: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessConfig {
    pub path: PathBuf,
    pub listen: SocketAddr,
    pub secret: Secret,
    pub state_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWitnessConfig {
    listen: String,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    state_file: PathBuf,
}

/// Parses witness config `text` read from `path`; `read_secret` reads a `secret_file`.
pub fn parse(
    path: &Path,
    text: &str,
    read_secret: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<WitnessConfig, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let raw: RawWitnessConfig = crate::config::parse_toml(path, text)?;
    let resolve = |p: &Path| crate::config::relative_to(path, p);
    let listen: SocketAddr = raw.listen.parse().map_err(|_| {
        invalid(format!(
            "listen = '{}': expected IP:PORT, such as 10.99.0.10:7790 or [fd00::10]:7790",
            raw.listen
        ))
    })?;
    let secret = crate::config::shared_secret(
        raw.secret,
        raw.secret_file.map(|f| resolve(&f)),
        read_secret,
        "the nodes' shared secret",
    )
    .map_err(invalid)?;
    if raw.state_file.as_os_str().is_empty() {
        return Err(invalid("state_file is empty".into()));
    }
    Ok(WitnessConfig {
        path: path.to_owned(),
        listen,
        secret: Secret(secret),
        state_file: resolve(&raw.state_file),
    })
}

pub fn load(path: &Path) -> Result<WitnessConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let read_secret = |p: &Path| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    parse(path, &text, &read_secret)
}

pub fn run(args: WitnessArgs) -> anyhow::Result<()> {
    let cfg = load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match args.debug {
        None => runtime.block_on(serve(cfg)),
        Some(DebugCommand::Client(c)) => runtime.block_on(ask(cfg, c)),
    }
}

async fn serve(cfg: WitnessConfig) -> anyhow::Result<()> {
    let server = WitnessServer::start(WitnessServerSpec {
        listen: cfg.listen,
        key: witness_key(&cfg.secret.0),
        state_file: cfg.state_file.clone(),
    })
    .await?;
    // Like the daemon's data_dir: the state file's folder is made on first start.
    if let Some(dir) = cfg.state_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "state_file {}: cannot create its folder {}",
                cfg.state_file.display(),
                dir.display()
            )
        })?;
    }
    info!(listen = %server.local_addr(), state_file = %cfg.state_file.display(), "serving witness");
    let signal = crate::export::wait_for_signal().await;
    info!(signal, "stopping witness");
    server.stop().await;
    Ok(())
}

async fn ask(cfg: WitnessConfig, c: ClientArgs) -> anyhow::Result<()> {
    let addr = c.witness.unwrap_or_else(|| {
        let ip = match cfg.listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, cfg.listen.port())
    });
    let client = WitnessClient::new(addr, c.node, witness_key(&cfg.secret.0))
        .with_timeout(Duration::from_millis(c.timeout_ms));
    let record = |r: Option<failover::witness::GroupRecord>| {
        r.map(|r| serde_json::json!({"round": r.round, "holder": r.holder, "generation": r.generation}))
    };
    let out = match c.op {
        ClientOp::Vote {
            group,
            round,
            generation,
        } => match client.vote(&group, round, generation).await? {
            VoteOutcome::Granted(r) => {
                serde_json::json!({"granted": true, "record": record(Some(r))})
            }
            VoteOutcome::Denied(r) => serde_json::json!({"granted": false, "record": record(r)}),
        },
        ClientOp::Lease { group, round } => {
            let l = client.lease(&group, round).await?;
            serde_json::json!({"holder": l.holder, "record": record(l.record)})
        }
        ClientOp::Query { group } => {
            let q = client.query(&group).await?;
            serde_json::json!({
                "record": record(q.record),
                "since_lease_ms": q.since_lease.map(|d| d.as_millis() as u64),
            })
        }
    };
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "listen = \"10.99.0.10:7790\"\nsecret = \"0123456789abcdef-example\"\nstate_file = \"witness-state.json\"\n";

    fn parse_str(text: &str) -> Result<WitnessConfig, ConfigError> {
        parse(
            Path::new("/etc/nbdmirror/witness.toml"),
            text,
            &|p: &Path| {
                assert_eq!(p, Path::new("/etc/nbdmirror/secret"));
                Ok("from-a-file-0123456789".into())
            },
        )
    }

    fn err(text: &str) -> String {
        parse_str(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn good_config_and_relative_paths() {
        let c = parse_str(GOOD).expect("good");
        assert_eq!(c.listen, "10.99.0.10:7790".parse().unwrap());
        assert_eq!(c.state_file, Path::new("/etc/nbdmirror/witness-state.json"));
        let c = parse_str(&GOOD.replace(
            "secret = \"0123456789abcdef-example\"",
            "secret_file = \"secret\"",
        ))
        .expect("secret_file");
        assert_eq!(c.secret.0, "from-a-file-0123456789");
        let c = parse_str(&GOOD.replace("witness-state.json", "/var/lib/w.json")).expect("abs");
        assert_eq!(c.state_file, Path::new("/var/lib/w.json"));
    }

    #[test]
    fn mistakes_get_clear_messages() {
        assert!(err(&GOOD.replace("10.99.0.10:7790", "witness:7790")).contains("expected IP:PORT"));
        assert!(err(&GOOD.replace("10.99.0.10:7790", "10.99.0.10")).contains("expected IP:PORT"));
        assert!(err(&GOOD.replace("0123456789abcdef-example", "short")).contains("at least 16"));
        assert!(
            err(&GOOD.replace("secret = \"0123456789abcdef-example\"\n", ""))
                .contains("no shared secret")
        );
        assert!(err(&format!("{GOOD}secret_file = \"secret\"\n")).contains("not both"));
        assert!(err(&format!("{GOOD}lisen = \"x\"\n")).contains("unknown field"));
        assert!(
            err(&GOOD.replace("state_file = \"witness-state.json\"\n", "")).contains("state_file")
        );
        let e = err("listen = ");
        assert!(
            e.starts_with("config /etc/nbdmirror/witness.toml:") && !e.contains('\n'),
            "{e}"
        );
    }
}
