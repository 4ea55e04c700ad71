//! The virtual IP of a group: added to an interface on takeover, removed on demotion.
//!
//! Addresses are changed through rtnetlink (`RTM_NEWADDR`, `RTM_DELADDR`, `RTM_GETADDR`) with
//! the `rtnetlink` crate, in the network namespace of the calling thread. Every operation is
//! idempotent: adding an address that is there, or removing one that is not, succeeds and says
//! so in its outcome. After an add, a gratuitous ARP (iputils `arping -U -c 1 -I IF ADDR`,
//! started in the background because arping lingers about a second after sending) tells the
//! neighbours' ARP caches that the address moved here; without it, clients keep sending to the
//! old holder until their cache entry expires (about a minute).
//!
//! Only IPv4 is supported: the gratuitous ARP is an IPv4 mechanism (IPv6 would need
//! unsolicited neighbour advertisements).

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::Handle;
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

/// The program that sends the gratuitous ARP (Debian package `iputils-arping`).
pub const ARPING: &str = "arping";

/// How long the background task waits for arping before giving up on its exit status.
const ARPING_WAIT: Duration = Duration::from_secs(10);

/// Linux limit on interface names (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// An IPv4 address with its prefix length, as in `10.99.0.100/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Vip {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Vip {
    /// A virtual IP; `prefix` must be 1..=32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Vip, VipError> {
        let vip = Vip { addr, prefix };
        if prefix == 0 || prefix > 32 {
            return Err(VipError::Parse {
                input: vip.to_string(),
                reason: "the prefix length must be 1 to 32".into(),
            });
        }
        Ok(vip)
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Vip {
    type Err = VipError;

    /// Parses `ADDRESS/PREFIX` (the prefix is required: a wrong one would add a wrong route).
    fn from_str(s: &str) -> Result<Vip, VipError> {
        let err = |reason: &str| VipError::Parse {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (addr, prefix) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| err("the prefix length is missing"))?;
        let addr: IpAddr = addr.parse().map_err(|_| err("not an IP address"))?;
        let IpAddr::V4(addr) = addr else {
            return Err(err("only IPv4 virtual IPs are supported"));
        };
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| err("the prefix length is not a number"))?;
        Vip::new(addr, prefix).map_err(|_| err("the prefix length must be 1 to 32"))
    }
}

/// What `add` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddOutcome {
    /// The address was not on the interface and now is.
    Added,
    /// It was already there (with the same prefix): nothing changed.
    AlreadyPresent,
}

/// What `remove` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveOutcome {
    /// The address was on the interface and is now gone.
    Removed,
    /// It was not there: nothing changed.
    NotPresent,
}

#[derive(Debug, Error)]
pub enum VipError {
    #[error("invalid virtual IP {input:?}: {reason} (expected IPv4 ADDRESS/PREFIX, such as 10.99.0.100/24)")]
    Parse { input: String, reason: String },
    #[error("invalid interface name {0:?}: a Linux interface name has 1 to 15 characters, without '/', ':' or white space")]
    InterfaceName(String),
    #[error("interface {ifname} does not exist (in this network namespace): check the group's vip_interface")]
    NoInterface { ifname: String },
    #[error("{addr} is already on {ifname} with prefix /{present}, not /{wanted}: fix the group's vip or remove that address by hand (ip addr del {addr}/{present} dev {ifname})")]
    PrefixConflict {
        addr: Ipv4Addr,
        ifname: String,
        present: u8,
        wanted: u8,
    },
    #[error("permission denied to {op} {vip} on {ifname}: changing addresses needs CAP_NET_ADMIN (run the daemon as root)")]
    Permission {
        op: &'static str,
        vip: Vip,
        ifname: String,
    },
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink: cannot {op} {vip} on {ifname}: {source}")]
    Netlink {
        op: &'static str,
        vip: Vip,
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start `{ARPING}` for the gratuitous ARP of {vip} on {ifname}: {source} (install iputils-arping; without it clients find the moved address only when their ARP cache expires)")]
    Arping {
        vip: Vip,
        ifname: String,
        #[source]
        source: io::Error,
    },
}

/// Adds `vip` to `ifname`, then announces it with a gratuitous ARP (also when it was already
/// there: a caller adds on takeover, when the neighbours must learn where it is).
///
/// The ARP is sent by a background `arping`; a failure to start it is logged, not returned:
/// the address works, clients merely find it later. Use [`announce`] to see that error.
pub async fn add(vip: Vip, ifname: &str) -> Result<AddOutcome, VipError> {
    let outcome = {
        let nl = Netlink::open()?;
        let index = nl.link_index(ifname, vip, "add").await?;
        if nl.find(index, vip, ifname, "add").await?.is_some() {
            AddOutcome::AlreadyPresent
        } else {
            match nl
                .handle
                .address()
                .add(index, IpAddr::V4(vip.addr), vip.prefix)
                .execute()
                .await
            {
                Ok(()) => AddOutcome::Added,
                // Added by someone else between our look and our add: the same end state.
                Err(e) if errno(&e) == Some(libc::EEXIST) => AddOutcome::AlreadyPresent,
                Err(e) => return Err(map_err(e, "add", vip, ifname)),
            }
        }
    };
    match outcome {
        AddOutcome::Added => info!(%vip, ifname, "virtual IP added"),
        AddOutcome::AlreadyPresent => info!(%vip, ifname, "virtual IP already present"),
    }
    if let Err(e) = announce(vip, ifname) {
        warn!(%vip, ifname, error = %e, "no gratuitous ARP");
    }
    Ok(outcome)
}

/// Removes `vip` from `ifname`; removing an address that is not there succeeds.
///
/// A missing interface is an error (the configuration names the wrong one); the same address
/// with another prefix is an error too (it is not ours to remove).
pub async fn remove(vip: Vip, ifname: &str) -> Result<RemoveOutcome, VipError> {
    let nl = Netlink::open()?;
    let index = nl.link_index(ifname, vip, "remove").await?;
    let Some(msg) = nl.find(index, vip, ifname, "remove").await? else {
        debug!(%vip, ifname, "virtual IP not present, nothing to remove");
        return Ok(RemoveOutcome::NotPresent);
    };
    match nl.handle.address().del(msg).execute().await {
        Ok(()) => {
            info!(%vip, ifname, "virtual IP removed");
            Ok(RemoveOutcome::Removed)
        }
        // Removed by someone else between our look and our delete.
        Err(e) if matches!(errno(&e), Some(libc::EADDRNOTAVAIL) | Some(libc::ENOENT)) => {
            Ok(RemoveOutcome::NotPresent)
        }
        Err(e) => Err(map_err(e, "remove", vip, ifname)),
    }
}

/// For daemon start-up: a node that starts is never the holder yet, so a virtual IP left by a
/// previous run (crash, kill -9) must go. Like [`remove`], but an interface that does not
/// exist holds no address, so that is `Ok(false)` (logged) rather than an error.
/// Returns whether an address was removed.
pub async fn remove_if_present(vip: Vip, ifname: &str) -> Result<bool, VipError> {
    match remove(vip, ifname).await {
        Ok(RemoveOutcome::Removed) => {
            warn!(%vip, ifname, "removed a virtual IP left behind by a previous run");
            Ok(true)
        }
        Ok(RemoveOutcome::NotPresent) => Ok(false),
        Err(VipError::NoInterface { ifname }) => {
            warn!(%vip, %ifname, "interface of the virtual IP does not exist (yet)");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Whether `vip` is on `ifname` (with that prefix). The same address with another prefix is
/// a [`VipError::PrefixConflict`].
pub async fn present(vip: Vip, ifname: &str) -> Result<bool, VipError> {
    let nl = Netlink::open()?;
    let index = nl.link_index(ifname, vip, "look up").await?;
    Ok(nl.find(index, vip, ifname, "look up").await?.is_some())
}

/// Sends one gratuitous ARP for `vip` out of `ifname`: starts `arping -q -U -c 1 -I IF ADDR`
/// and returns at once (must be called inside a tokio runtime). A background task logs a
/// non-zero exit with arping's message.
pub fn announce(vip: Vip, ifname: &str) -> Result<(), VipError> {
    check_ifname(ifname)?;
    let addr = vip.addr.to_string();
    let mut child = tokio::process::Command::new(ARPING)
        .args(["-q", "-U", "-c", "1", "-I", ifname, &addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| VipError::Arping {
            vip,
            ifname: ifname.to_string(),
            source,
        })?;
    debug!(%vip, ifname, pid = child.id(), "gratuitous ARP sent");
    let ifname = ifname.to_string();
    tokio::spawn(async move {
        let mut stderr = String::new();
        let waited = tokio::time::timeout(ARPING_WAIT, async {
            if let Some(mut err) = child.stderr.take() {
                // Bounded: arping prints a line or two.
                let _ = (&mut err).take(4096).read_to_string(&mut stderr).await;
            }
            child.wait().await
        })
        .await;
        match waited {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => {
                warn!(%vip, %ifname, %status, stderr = stderr.trim(), "arping failed")
            }
            Ok(Err(e)) => warn!(%vip, %ifname, error = %e, "cannot wait for arping"),
            Err(_) => {
                warn!(%vip, %ifname, "arping still running after {ARPING_WAIT:?}; killing it");
                let _ = child.start_kill();
            }
        }
    });
    Ok(())
}

/// One netlink connection, in the calling thread's network namespace; its task ends with it.
struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Netlink {
    fn open() -> Result<Netlink, VipError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(VipError::Socket)?;
        let task = tokio::spawn(conn);
        Ok(Netlink { handle, task })
    }

    async fn link_index(&self, ifname: &str, vip: Vip, op: &'static str) -> Result<u32, VipError> {
        check_ifname(ifname)?;
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(ifname.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(VipError::NoInterface {
                ifname: ifname.to_string(),
            }),
            Err(e) => Err(map_err(e, op, vip, ifname)),
        }
    }

    /// The address message of `vip` on interface `index`, if there; another prefix is an error.
    async fn find(
        &self,
        index: u32,
        vip: Vip,
        ifname: &str,
        op: &'static str,
    ) -> Result<Option<AddressMessage>, VipError> {
        let mut req = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(vip.addr));
        req.message_mut().header.family = AddressFamily::Inet;
        let mut found = req.execute();
        while let Some(msg) = found
            .try_next()
            .await
            .map_err(|e| map_err(e, op, vip, ifname))?
        {
            // The filter also matches a point-to-point peer address; the local one is ours.
            if local_v4(&msg) != Some(vip.addr) {
                continue;
            }
            if msg.header.prefix_len != vip.prefix {
                return Err(VipError::PrefixConflict {
                    addr: vip.addr,
                    ifname: ifname.to_string(),
                    present: msg.header.prefix_len,
                    wanted: vip.prefix,
                });
            }
            return Ok(Some(msg));
        }
        Ok(None)
    }
}

/// The interface's own address of an IPv4 address message (IFA_LOCAL, else IFA_ADDRESS).
fn local_v4(msg: &AddressMessage) -> Option<Ipv4Addr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V4(a)) => return Some(*a),
            AddressAttribute::Address(IpAddr::V4(a)) => address = Some(*a),
            _ => {}
        }
    }
    address
}

fn check_ifname(ifname: &str) -> Result<(), VipError> {
    let bad = ifname.is_empty()
        || ifname.len() > MAX_IFNAME
        || ifname == "."
        || ifname == ".."
        || ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if bad {
        return Err(VipError::InterfaceName(ifname.to_string()));
    }
    Ok(())
}

/// The errno of a netlink error answer, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) if msg.raw_code() != 0 => Some(msg.raw_code().abs()),
        _ => None,
    }
}

fn map_err(e: rtnetlink::Error, op: &'static str, vip: Vip, ifname: &str) -> VipError {
    let ifname = ifname.to_string();
    match errno(&e) {
        Some(libc::EPERM) | Some(libc::EACCES) => VipError::Permission { op, vip, ifname },
        Some(libc::ENODEV) => VipError::NoInterface { ifname },
        Some(code) => VipError::Netlink {
            op,
            vip,
            ifname,
            source: io::Error::from_raw_os_error(code),
        },
        None => VipError::Netlink {
            op,
            vip,
            ifname,
            source: io::Error::other(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::ErrorMessage;
    use std::num::NonZeroI32;

    fn nl_error(code: i32) -> rtnetlink::Error {
        let mut msg = ErrorMessage::default();
        msg.code = NonZeroI32::new(code);
        rtnetlink::Error::NetlinkError(msg)
    }

    #[test]
    fn parses_address_and_prefix() {
        let vip: Vip = "10.99.0.100/24".parse().expect("valid");
        assert_eq!(vip.addr, Ipv4Addr::new(10, 99, 0, 100));
        assert_eq!(vip.prefix, 24);
        assert_eq!(vip.to_string(), "10.99.0.100/24");
        assert_eq!(" 10.0.0.1/32 ".parse::<Vip>().expect("valid").prefix, 32);
    }

    #[test]
    fn refuses_bad_addresses() {
        for bad in [
            "10.99.0.100",
            "10.99.0.100/",
            "10.99.0.100/33",
            "10.99.0.100/0",
            "10.99.0/24",
            "fd00::1/64",
            "vip/24",
            "",
        ] {
            let err = bad.parse::<Vip>().expect_err(bad);
            assert!(matches!(err, VipError::Parse { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("10.99.0.100/24"), "{err}");
        }
    }

    #[test]
    fn checks_interface_names() {
        for good in ["pub0", "eth0", "enp0s31f6", "br-lan.100", "a23456789012345"] {
            check_ifname(good).expect(good);
        }
        for bad in ["", "a234567890123456", "a/b", "a b", "a:1", ".", ".."] {
            assert!(matches!(check_ifname(bad), Err(VipError::InterfaceName(_))));
        }
    }

    #[test]
    fn maps_netlink_errors_to_actionable_ones() {
        let vip: Vip = "10.0.0.1/24".parse().expect("valid");
        let e = map_err(nl_error(-libc::EPERM), "add", vip, "pub0");
        assert!(matches!(e, VipError::Permission { .. }));
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
        let e = map_err(nl_error(-libc::ENODEV), "add", vip, "pub0");
        assert!(matches!(e, VipError::NoInterface { ref ifname } if ifname == "pub0"));
        let e = map_err(nl_error(-libc::EINVAL), "remove", vip, "pub0");
        assert!(e.to_string().contains("remove 10.0.0.1/24 on pub0"), "{e}");
        assert_eq!(errno(&nl_error(-libc::EEXIST)), Some(libc::EEXIST));
        assert_eq!(errno(&rtnetlink::Error::RequestFailed), None);
    }
}
