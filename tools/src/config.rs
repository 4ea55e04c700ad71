//! The node configuration file (`nbdmirror serve --config FILE`): one TOML file per node.
//!
//! Parsing and validation are pure (text in, [`NodeConfig`] or a [`ConfigError`] out), so
//! every mistake an operator can make gets a tested, specific message. Relative paths are
//! resolved against the folder of the config file, so a config and its data can move
//! together.
//!
//! ```toml
//! node = "node-a"
//! data_dir = "state/node-a"              # metadata files; default control socket here
//! secret = "a long random string"        # or: secret_file = "/etc/nbdmirror/secret"
//! replication_listen = "127.0.0.1:7801"
//! peer = "127.0.0.1:7802"
//! # control_socket = "state/node-a/control.sock"
//!
//! [[volume]]
//! name = "disk0"
//! image = "state/node-a/disk0.img"
//! size = "256M"                          # or a number of bytes
//! listen = "127.0.0.1:10809"             # or a list of addresses
//! ```
//!
//! Optional tuning keys (top level): `peer_timeout` (default "5s": link silence that declares
//! the peer gone), `peer_flush_interval` (default "30s": longest a primary lets the peer hold
//! acknowledged writes in its page cache without a flush; what a dropped link costs in resync),
//! `resync_rate` (bytes per second with K/M/G suffix, default 0 = no limit;
//! resync always yields to application I/O), `resync_checksum` (default false: hash-compare
//! chunks first and send only those that differ), `io_engine` ("auto", "uring", "sync").
//! The `[heartbeat]` and `[[group]]` tables (failover) are parsed below too. README.md's
//! "Configuration reference" lists every key with its default: keep it in step with
//! the raw structs here.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use nbd_server::ListenAddr;
use serde::Deserialize;

use crate::size::parse_size;

/// Volume sizes are whole 512-byte sectors, as every NBD client and hypervisor expects.
const SECTOR: u64 = 512;

/// Shorter secrets are refused: they are the only thing standing between the replication
/// port and anyone who can reach it.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read config {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config {path}: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The file this came from (for messages).
    pub path: PathBuf,
    pub node: String,
    pub data_dir: PathBuf,
    pub control_socket: PathBuf,
    pub secret: Secret,
    pub replication_listen: String,
    pub peer: String,
    pub peer_timeout: std::time::Duration,
    pub peer_flush_interval: std::time::Duration,
    pub resync_rate: u64,
    pub resync_checksum: bool,
    pub io_engine: String,
    pub volumes: Vec<VolumeConfig>,
    pub heartbeat: Option<HeartbeatConfig>,
    pub groups: Vec<GroupConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// (local listen, peer) UDP address pairs, one per network link.
    pub links: Vec<(String, String)>,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    pub witness: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    pub name: String,
    pub volumes: Vec<String>,
    pub preferred_node: String,
    /// (address, prefix length) and interface.
    pub vip: Option<(std::net::Ipv4Addr, u8, String)>,
    pub auto_failback: bool,
    pub hooks: HooksConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HooksConfig {
    pub start: Option<String>,
    pub stop: Option<String>,
    pub monitor: Option<String>,
    pub fence: Option<String>,
    pub timeout: std::time::Duration,
    pub monitor_interval: std::time::Duration,
    pub restart_attempts: u32,
    pub fence_delay: std::time::Duration,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never in logs.
        write!(f, "Secret(..{} bytes)", self.0.len())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    pub name: String,
    pub image: PathBuf,
    pub size: u64,
    pub listen: Vec<ListenAddr>,
    /// `<data_dir>/<name>.meta`.
    pub metadata: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: String,
    data_dir: PathBuf,
    control_socket: Option<PathBuf>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    replication_listen: String,
    peer: String,
    peer_timeout: Option<RawSize>,
    peer_flush_interval: Option<RawSize>,
    resync_rate: Option<RawSize>,
    #[serde(default)]
    resync_checksum: bool,
    io_engine: Option<String>,
    #[serde(default, rename = "volume")]
    volumes: Vec<RawVolume>,
    heartbeat: Option<RawHeartbeat>,
    #[serde(default, rename = "group")]
    groups: Vec<RawGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeartbeat {
    links: Vec<RawLink>,
    interval: Option<RawSize>,
    timeout: Option<RawSize>,
    witness: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    listen: String,
    peer: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    volumes: Vec<String>,
    preferred_node: String,
    vip: Option<String>,
    vip_interface: Option<String>,
    #[serde(default)]
    auto_failback: bool,
    #[serde(default)]
    hooks: RawHooks,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    start: Option<String>,
    stop: Option<String>,
    monitor: Option<String>,
    fence: Option<String>,
    timeout: Option<RawSize>,
    monitor_interval: Option<RawSize>,
    restart_attempts: Option<u32>,
    fence_delay: Option<RawSize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: String,
    image: PathBuf,
    size: RawSize,
    listen: OneOrMany,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The shared secret from `secret` or `secret_file` (already resolved), checked for length.
/// Shared by the node and witness configs; `whose` completes "set secret_file (or secret)
/// to ...".
pub fn shared_secret(
    inline: Option<String>,
    file: Option<PathBuf>,
    read_secret: &dyn Fn(&Path) -> std::io::Result<String>,
    whose: &str,
) -> Result<String, String> {
    let secret = match (inline, file) {
        (Some(_), Some(_)) => return Err("set either secret or secret_file, not both".into()),
        (None, None) => {
            return Err(format!(
                "no shared secret: set secret_file (or secret) to {whose}"
            ))
        }
        (Some(s), None) => s,
        (None, Some(file)) => read_secret(&file)
            .map_err(|e| format!("cannot read secret_file {}: {e}", file.display()))?,
    };
    if secret.len() < MIN_SECRET_LEN {
        return Err(format!(
            "the shared secret is {} characters; use at least {MIN_SECRET_LEN}",
            secret.len()
        ));
    }
    Ok(secret)
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let read_secret = |p: &Path| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    parse(path, &text, &read_secret)
}

/// Names usable in file names, URIs and logs without quoting.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

fn check_tcp_addr(field: &str, value: &str) -> Result<(), String> {
    match value.parse::<ListenAddr>() {
        Ok(ListenAddr::Tcp(_)) => Ok(()),
        Ok(ListenAddr::Unix(_)) => Err(format!("{field} must be HOST:PORT, not a unix socket")),
        Err(e) => Err(format!("{field}: {e}")),
    }
}

/// Deserializes a TOML config, with a one-line syntax error naming the file.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        reason: e.to_string().trim_end().replace('\n', " "),
    })
}

/// `p` as written in the config at `config`: relative paths are relative to its folder.
pub fn relative_to(config: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        config.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Parses config `text` that was read from `path`. `read_secret` reads a `secret_file`.
pub fn parse(
    path: &Path,
    text: &str,
    read_secret: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<NodeConfig, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let raw: RawConfig = parse_toml(path, text)?;
    let resolve = |p: &Path| relative_to(path, p);
    if !valid_name(&raw.node) {
        return Err(invalid(format!(
            "node name '{}' must be 1-63 letters, digits, '-', '_' or '.'",
            raw.node
        )));
    }
    let secret = shared_secret(
        raw.secret,
        raw.secret_file.map(|f| resolve(&f)),
        read_secret,
        "the same long random string on both nodes",
    )
    .map_err(invalid)?;
    check_tcp_addr("replication_listen", &raw.replication_listen).map_err(invalid)?;
    check_tcp_addr("peer", &raw.peer).map_err(invalid)?;
    if raw.replication_listen == raw.peer {
        return Err(invalid(
            "peer is this node's own replication_listen address".into(),
        ));
    }
    let data_dir = resolve(&raw.data_dir);
    let control_socket = raw
        .control_socket
        .map(|p| resolve(&p))
        .unwrap_or_else(|| data_dir.join("control.sock"));

    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    let mut volumes = Vec::new();
    for v in raw.volumes {
        if !valid_name(&v.name) {
            return Err(invalid(format!(
                "volume name '{}' must be 1-63 letters, digits, '-', '_' or '.'",
                v.name
            )));
        }
        if !names.insert(v.name.clone()) {
            return Err(invalid(format!("volume '{}' is defined twice", v.name)));
        }
        let size = match v.size {
            RawSize::Bytes(0) => {
                return Err(invalid(format!("volume '{}': size must be > 0", v.name)))
            }
            RawSize::Bytes(n) => n,
            RawSize::Text(t) => {
                parse_size(&t).map_err(|e| invalid(format!("volume '{}': {e}", v.name)))?
            }
        };
        if size % SECTOR != 0 {
            // Most likely a forgotten suffix ("100" for 100G): a disk of a few bytes, or one
            // that is not a whole number of sectors, would only surprise later.
            return Err(invalid(format!(
                "volume '{}': size {size} bytes is not a multiple of {SECTOR} (a disk sector); \
                 a forgotten suffix? Sizes take K, M, G or T (binary), e.g. size = \"{size}G\"",
                v.name
            )));
        }
        let texts = match v.listen {
            OneOrMany::One(a) => vec![a],
            OneOrMany::Many(list) => list,
        };
        if texts.is_empty() {
            return Err(invalid(format!(
                "volume '{}': listen needs at least one address",
                v.name
            )));
        }
        let mut listen = Vec::new();
        for t in texts {
            let addr: ListenAddr = t
                .parse()
                .map_err(|e| invalid(format!("volume '{}': listen: {e}", v.name)))?;
            let addr = match addr {
                ListenAddr::Unix(p) => ListenAddr::Unix(resolve(&p)),
                tcp => tcp,
            };
            if !addresses.insert(addr.to_string()) {
                return Err(invalid(format!(
                    "volume '{}': listen address {addr} is used twice",
                    v.name
                )));
            }
            listen.push(addr);
        }
        volumes.push(VolumeConfig {
            metadata: data_dir.join(format!("{}.meta", v.name)),
            name: v.name,
            image: resolve(&v.image),
            size,
            listen,
        });
    }
    if volumes.is_empty() {
        return Err(invalid("no [[volume]] defined".into()));
    }
    let duration_or = |v: Option<RawSize>, default: std::time::Duration, key: &str| match v {
        None => Ok(default),
        Some(t) => parse_duration(&t).map_err(|e| invalid(format!("{key}: {e}"))),
    };
    let secs = std::time::Duration::from_secs;
    let peer_timeout = duration_or(raw.peer_timeout, secs(5), "peer_timeout")?;
    if peer_timeout < std::time::Duration::from_millis(200) || peer_timeout > secs(600) {
        return Err(invalid(
            "peer_timeout must be between 200ms and 600s".into(),
        ));
    }
    let peer_flush_interval = duration_or(
        raw.peer_flush_interval,
        mirror::volume::DEFAULT_PEER_FLUSH_INTERVAL,
        "peer_flush_interval",
    )?;
    if peer_flush_interval < secs(1) || peer_flush_interval > secs(3600) {
        return Err(invalid(
            "peer_flush_interval must be between 1s and 3600s".into(),
        ));
    }
    let resync_rate = match raw.resync_rate {
        None | Some(RawSize::Bytes(0)) => 0,
        Some(RawSize::Bytes(n)) => n,
        Some(RawSize::Text(t)) if t.trim() == "0" => 0,
        Some(RawSize::Text(t)) => {
            parse_size(&t).map_err(|e| invalid(format!("resync_rate: {e}")))?
        }
    };
    let heartbeat = match raw.heartbeat {
        None => None,
        Some(h) => {
            if h.links.is_empty() {
                return Err(invalid(
                    "heartbeat.links needs at least one { listen, peer } pair".into(),
                ));
            }
            let mut links = Vec::new();
            for l in h.links {
                check_tcp_addr("heartbeat.links.listen", &l.listen).map_err(invalid)?;
                check_tcp_addr("heartbeat.links.peer", &l.peer).map_err(invalid)?;
                links.push((l.listen, l.peer));
            }
            if let Some(w) = &h.witness {
                check_tcp_addr("heartbeat.witness", w).map_err(invalid)?;
            }
            let interval = duration_or(
                h.interval,
                std::time::Duration::from_millis(500),
                "heartbeat.interval",
            )?;
            let timeout = duration_or(
                h.timeout,
                std::time::Duration::from_secs(3),
                "heartbeat.timeout",
            )?;
            // With a witness every heartbeat renews the primary's lease, which lasts
            // LEASE_VALIDITY: a slower beat would let the lease lapse between renewals and
            // suspend a healthy primary.
            let max_interval = if h.witness.is_some() {
                failover::witness::LEASE_VALIDITY / 3
            } else {
                secs(10)
            };
            if interval < std::time::Duration::from_millis(50) || interval > max_interval {
                return Err(invalid(format!(
                    "heartbeat.interval must be between 50ms and {}ms{}",
                    max_interval.as_millis(),
                    if h.witness.is_some() {
                        " with a witness (each beat renews the primary's lease)"
                    } else {
                        ""
                    }
                )));
            }
            if timeout < interval * 2 || timeout > secs(600) {
                return Err(invalid(
                    "heartbeat.timeout must be at least twice heartbeat.interval and at most 600s"
                        .into(),
                ));
            }
            Some(HeartbeatConfig {
                links,
                interval,
                timeout,
                witness: h.witness,
            })
        }
    };
    let mut groups: Vec<GroupConfig> = Vec::new();
    let mut grouped = HashSet::new();
    for g in raw.groups {
        if !valid_name(&g.name) {
            return Err(invalid(format!(
                "group name '{}' must be 1-63 letters, digits, '-', '_' or '.'",
                g.name
            )));
        }
        if groups.iter().any(|x| x.name == g.name) {
            return Err(invalid(format!("group '{}' is defined twice", g.name)));
        }
        if g.volumes.is_empty() {
            return Err(invalid(format!("group '{}': volumes is empty", g.name)));
        }
        for v in &g.volumes {
            if !volumes.iter().any(|x| &x.name == v) {
                return Err(invalid(format!(
                    "group '{}': no [[volume]] named '{v}'",
                    g.name
                )));
            }
            if !grouped.insert(v.clone()) {
                return Err(invalid(format!(
                    "volume '{v}' is in two groups; a volume belongs to at most one"
                )));
            }
        }
        let vip = match (g.vip, g.vip_interface) {
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(invalid(format!(
                    "group '{}': set both vip (\"address/prefix\") and vip_interface, or neither",
                    g.name
                )))
            }
            (Some(v), Some(iface)) => {
                let (a, p) = v.split_once('/').ok_or_else(|| {
                    invalid(format!(
                        "group '{}': vip '{v}' must be address/prefix, e.g. 10.99.0.100/24",
                        g.name
                    ))
                })?;
                let addr: std::net::Ipv4Addr = a.parse().map_err(|_| {
                    invalid(format!(
                        "group '{}': vip address '{a}' is not an IPv4 address",
                        g.name
                    ))
                })?;
                let prefix: u8 = p.parse().ok().filter(|p| *p <= 32).ok_or_else(|| {
                    invalid(format!("group '{}': vip prefix '{p}' must be 0-32", g.name))
                })?;
                Some((addr, prefix, iface))
            }
        };
        let hooks = HooksConfig {
            start: g.hooks.start,
            stop: g.hooks.stop,
            monitor: g.hooks.monitor,
            fence: g.hooks.fence,
            timeout: duration_or(
                g.hooks.timeout,
                std::time::Duration::from_secs(60),
                "hooks.timeout",
            )?,
            monitor_interval: duration_or(
                g.hooks.monitor_interval,
                std::time::Duration::from_secs(5),
                "hooks.monitor_interval",
            )?,
            restart_attempts: g.hooks.restart_attempts.unwrap_or(3),
            fence_delay: duration_or(
                g.hooks.fence_delay,
                std::time::Duration::ZERO,
                "hooks.fence_delay",
            )?,
        };
        if hooks.fence_delay > secs(600) {
            return Err(invalid(format!(
                "group '{}': hooks.fence_delay must be at most 10min",
                g.name
            )));
        }
        if hooks.timeout < secs(1) || hooks.timeout > secs(24 * 3600) {
            return Err(invalid(format!(
                "group '{}': hooks.timeout must be between 1s and 24h",
                g.name
            )));
        }
        if hooks.monitor_interval < secs(1) || hooks.monitor_interval > secs(24 * 3600) {
            return Err(invalid(format!(
                "group '{}': hooks.monitor_interval must be between 1s and 24h",
                g.name
            )));
        }
        groups.push(GroupConfig {
            name: g.name,
            volumes: g.volumes,
            preferred_node: g.preferred_node,
            vip,
            auto_failback: g.auto_failback,
            hooks,
        });
    }
    // Every group's state travels in each heartbeat: a set that does not fit would leave the
    // peer seeing every group stopped.
    failover::driver::check_payload_size(groups.iter().map(|g| g.name.as_str()))
        .map_err(|e| invalid(e.to_string()))?;
    if !groups.is_empty() && heartbeat.is_none() {
        return Err(invalid(
            "groups fail over on heartbeats: add a [heartbeat] section with links".into(),
        ));
    }
    let io_engine = raw.io_engine.unwrap_or_else(|| "auto".into());
    if !matches!(io_engine.as_str(), "auto" | "uring" | "sync") {
        return Err(invalid(format!(
            "io_engine '{io_engine}' must be auto, uring or sync"
        )));
    }
    Ok(NodeConfig {
        path: path.to_owned(),
        node: raw.node,
        data_dir,
        control_socket,
        secret: Secret(secret),
        replication_listen: raw.replication_listen,
        peer: raw.peer,
        peer_timeout,
        peer_flush_interval,
        resync_rate,
        resync_checksum: raw.resync_checksum,
        io_engine,
        volumes,
        heartbeat,
        groups,
    })
}

/// A duration: a number of seconds, or a string such as "5s", "500ms", "2m".
fn parse_duration(raw: &RawSize) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    match raw {
        RawSize::Bytes(n) => Ok(Duration::from_secs(*n)),
        RawSize::Text(t) => {
            let t = t.trim();
            let (num, unit) = t
                .find(|c: char| !c.is_ascii_digit())
                .map(|i| t.split_at(i))
                .unwrap_or((t, "s"));
            let n: u64 = num
                .parse()
                .map_err(|_| format!("'{t}' is not a duration such as \"5s\" or \"500ms\""))?;
            match unit.trim() {
                "ms" => Ok(Duration::from_millis(n)),
                "s" | "" => Ok(Duration::from_secs(n)),
                "m" => n
                    .checked_mul(60)
                    .map(Duration::from_secs)
                    .ok_or_else(|| format!("'{t}' is too long")),
                other => Err(format!("unknown unit '{other}' in '{t}' (use ms, s or m)")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node = "node-a"
data_dir = "state/node-a"
secret = "0123456789abcdef-example"
replication_listen = "127.0.0.1:7801"
peer = "127.0.0.1:7802"

[[volume]]
name = "disk0"
image = "state/node-a/disk0.img"
size = "256M"
listen = "127.0.0.1:10809"

[[volume]]
name = "disk1"
image = "/srv/disk1.img"
size = 1048576
listen = ["127.0.0.1:10811", "unix:run/disk1.sock"]
"#;

    fn no_file(_: &Path) -> std::io::Result<String> {
        Err(std::io::Error::from(std::io::ErrorKind::NotFound))
    }

    fn parse_ok(text: &str) -> NodeConfig {
        parse(Path::new("/etc/nbdmirror/node-a.toml"), text, &no_file).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse(Path::new("/etc/nbdmirror/node-a.toml"), text, &no_file)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let c = parse_ok(GOOD);
        assert_eq!(c.data_dir, PathBuf::from("/etc/nbdmirror/state/node-a"));
        assert_eq!(
            c.control_socket,
            PathBuf::from("/etc/nbdmirror/state/node-a/control.sock")
        );
        assert_eq!(
            c.volumes[0].image,
            PathBuf::from("/etc/nbdmirror/state/node-a/disk0.img")
        );
        assert_eq!(c.volumes[1].image, PathBuf::from("/srv/disk1.img"));
        assert_eq!(
            c.volumes[0].metadata,
            PathBuf::from("/etc/nbdmirror/state/node-a/disk0.meta")
        );
        assert_eq!(
            c.volumes[1].listen[1],
            ListenAddr::Unix("/etc/nbdmirror/run/disk1.sock".into())
        );
    }

    #[test]
    fn sizes_take_numbers_and_suffixes() {
        let c = parse_ok(GOOD);
        assert_eq!(c.volumes[0].size, 256 << 20);
        assert_eq!(c.volumes[1].size, 1 << 20);
    }

    #[test]
    fn secret_never_shows_in_debug_output() {
        let c = parse_ok(GOOD);
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn secret_file_is_read_and_trimmed() {
        let text = GOOD.replace(
            "secret = \"0123456789abcdef-example\"",
            "secret_file = \"secret\"",
        );
        let read = |p: &Path| {
            assert_eq!(p, Path::new("/etc/nbdmirror/secret"));
            Ok("from-a-file-0123456789\n".trim().to_string())
        };
        let c = parse(Path::new("/etc/nbdmirror/node-a.toml"), &text, &read).unwrap();
        assert_eq!(c.secret.0, "from-a-file-0123456789");
    }

    #[test]
    fn mistakes_get_specific_messages() {
        let cases = [
            (
                GOOD.replace("node-a\"\ndata", "node a\"\ndata"),
                "node name",
            ),
            (
                GOOD.replace("0123456789abcdef-example", "short"),
                "at least 16",
            ),
            (
                GOOD.replace("secret = \"0123456789abcdef-example\"", ""),
                "no shared secret",
            ),
            (GOOD.replace("\"256M\"", "\"12Q\""), "volume 'disk0'"),
            (GOOD.replace("\"256M\"", "0"), "size must be > 0"),
            (GOOD.replace("\"256M\"", "\"100\""), "a forgotten suffix"),
            (GOOD.replace("\"256M\"", "1000000"), "not a multiple of 512"),
            (GOOD.replace("disk1\"", "disk0\""), "defined twice"),
            (
                GOOD.replace("127.0.0.1:10811", "127.0.0.1:10809"),
                "used twice",
            ),
            (
                GOOD.replace("127.0.0.1:7802", "127.0.0.1:7801"),
                "own replication_listen",
            ),
            (GOOD.replace("127.0.0.1:7802", "nowhere"), "peer"),
            (
                GOOD.replace("size = 1048576", "size = 1048576\ncolour = 1"),
                "colour",
            ),
            (
                GOOD.replace("listen = \"127.0.0.1:10809\"", "listen = []"),
                "at least one",
            ),
            ("node = \"x\"".to_string(), "missing field"),
        ];
        for (text, expected) in cases {
            let err = parse_err(&text);
            assert!(err.contains(expected), "expected '{expected}' in: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn tuning_keys_have_defaults_and_are_checked() {
        let c = parse_ok(GOOD);
        assert_eq!(c.peer_timeout, std::time::Duration::from_secs(5));
        assert_eq!(c.resync_rate, 0);
        assert!(!c.resync_checksum);
        let c = parse_ok(&format!(
            "peer_timeout = \"1500ms\"\nresync_rate = \"50M\"\nresync_checksum = true\n{GOOD}"
        ));
        assert_eq!(c.peer_timeout, std::time::Duration::from_millis(1500));
        assert_eq!(c.resync_rate, 50 << 20);
        assert!(c.resync_checksum);
        assert!(parse_err(&format!("peer_timeout = \"5h\"\n{GOOD}")).contains("unknown unit"));
        assert!(parse_err(&format!("peer_timeout = 0\n{GOOD}")).contains("between"));
    }

    #[test]
    fn peer_flush_interval_defaults_to_the_kernels_dirty_expiry_and_is_checked() {
        let c = parse_ok(GOOD);
        assert_eq!(c.peer_flush_interval, std::time::Duration::from_secs(30));
        let c = parse_ok(&format!("peer_flush_interval = \"2s\"\n{GOOD}"));
        assert_eq!(c.peer_flush_interval, std::time::Duration::from_secs(2));
        let c = parse_ok(&format!("peer_flush_interval = 120\n{GOOD}"));
        assert_eq!(c.peer_flush_interval, std::time::Duration::from_secs(120));
        for bad in ["\"500ms\"", "0", "\"2h\"", "7200"] {
            let err = parse_err(&format!("peer_flush_interval = {bad}\n{GOOD}"));
            assert!(err.contains("peer_flush_interval"), "{bad}: {err}");
        }
    }

    #[test]
    fn groups_and_heartbeats_parse_and_are_checked() {
        let hb = "[heartbeat]\nlinks = [{ listen = \"10.99.0.1:7790\", peer = \"10.99.0.2:7790\" }]\nwitness = \"10.99.0.10:7790\"\n";
        let group = "[[group]]\nname = \"vm1\"\nvolumes = [\"disk0\"]\npreferred_node = \"node-a\"\nvip = \"10.99.0.100/24\"\nvip_interface = \"pub0\"\nhooks = { start = \"true\", timeout = \"10s\" }\n";
        let c = parse_ok(&format!("{GOOD}\n{hb}\n{group}"));
        let h = c.heartbeat.unwrap();
        assert_eq!(h.timeout, std::time::Duration::from_secs(3));
        assert_eq!(h.witness.as_deref(), Some("10.99.0.10:7790"));
        let g = &c.groups[0];
        assert_eq!(
            g.vip,
            Some(("10.99.0.100".parse().unwrap(), 24, "pub0".into()))
        );
        assert_eq!(g.hooks.timeout, std::time::Duration::from_secs(10));
        assert_eq!(g.hooks.start.as_deref(), Some("true"));
        assert!(parse_err(&format!("{GOOD}\n{group}")).contains("[heartbeat]"));
        assert!(
            parse_err(&format!("{GOOD}\n{hb}\n{}", group.replace("disk0", "nope")))
                .contains("no [[volume]] named 'nope'")
        );
        assert!(
            parse_err(&format!("{GOOD}\n{hb}\n{}", group.replace("/24", "")))
                .contains("address/prefix")
        );
        // Durations are bounded both ways: a beat slower than a third of the lease would let
        // a healthy primary's lease lapse, and huge values would overflow deadlines.
        let slow = hb.replace("witness =", "interval = \"1s\"\nwitness =");
        assert!(parse_err(&format!("{GOOD}\n{slow}\n{group}")).contains("heartbeat.interval"));
        let no_witness = "[heartbeat]\nlinks = [{ listen = \"10.99.0.1:7790\", peer = \"10.99.0.2:7790\" }]\ninterval = \"1s\"\n";
        parse_ok(&format!("{GOOD}\n{no_witness}\n{group}"));
        for (extra, key) in [
            ("interval = \"1ms\"\n", "heartbeat.interval"),
            ("timeout = \"1000s\"\n", "heartbeat.timeout"),
        ] {
            let h = hb.replace("witness =", &format!("{extra}witness ="));
            assert!(
                parse_err(&format!("{GOOD}\n{h}\n{group}")).contains(key),
                "{extra}"
            );
        }
        for (from, key) in [
            ("timeout = \"10s\"", "hooks.timeout"),
            (
                "timeout = \"10s\", monitor_interval = \"10ms\"",
                "hooks.monitor_interval",
            ),
        ] {
            let bad = if key == "hooks.timeout" {
                group.replace(from, "timeout = \"100000000s\"")
            } else {
                group.replace("timeout = \"10s\"", from)
            };
            assert!(
                parse_err(&format!("{GOOD}\n{hb}\n{bad}")).contains(key),
                "{bad}"
            );
        }
    }

    #[test]
    fn groups_that_do_not_fit_in_a_heartbeat_are_refused() {
        let hb =
            "[heartbeat]\nlinks = [{ listen = \"10.99.0.1:7790\", peer = \"10.99.0.2:7790\" }]\n";
        // 63-character names: 16 groups fit in a heartbeat, 17 do not.
        let config = |groups: usize| {
            let mut text = format!("{GOOD}\n{hb}\n");
            for i in 0..groups {
                text.push_str(&format!(
                    "[[volume]]\nname = \"d{i}\"\nimage = \"state/d{i}.img\"\nsize = \"1M\"\nlisten = \"127.0.0.1:{}\"\n",
                    20000 + i
                ));
                text.push_str(&format!(
                    "[[group]]\nname = \"{:g<63}\"\nvolumes = [\"d{i}\"]\npreferred_node = \"node-a\"\n",
                    format!("g{i}-")
                ));
            }
            text
        };
        assert_eq!(parse_ok(&config(16)).groups.len(), 16);
        let err = parse_err(&config(17));
        assert!(err.contains("fit in a heartbeat"), "{err}");
        assert!(
            err.contains("g16-"),
            "names the first group that does not fit: {err}"
        );
    }

    #[test]
    fn a_config_without_volumes_is_refused() {
        let text = GOOD.split("[[volume]]").next().unwrap_or_default();
        assert!(parse_err(text).contains("no [[volume]]"));
    }

    #[test]
    fn the_shipped_local_pair_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/local-pair");
        for (file, listen) in [
            ("node-a.toml", "127.0.0.1:10809"),
            ("node-b.toml", "127.0.0.1:10810"),
        ] {
            let c = load(&dir.join(file)).unwrap();
            assert_eq!(c.volumes.len(), 1);
            assert_eq!(c.volumes[0].name, "disk0");
            assert_eq!(c.volumes[0].size, 256 << 20);
            assert_eq!(c.volumes[0].listen, vec![ListenAddr::Tcp(listen.into())]);
        }
    }
}
