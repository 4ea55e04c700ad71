//! The virtual IP against a real kernel: each test makes two private network namespaces joined
//! by a veth pair ("node" holds the VIP, "client" is its neighbour), runs `failover::vip` on a
//! thread that entered the node namespace (setns), and checks with `ip -j` and `ip neigh`.
//! Needs root (CI runs as root). Nothing is created in the test process's own namespace, and
//! the namespaces vanish with their holder processes, even if a test panics or is killed.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use failover::vip::{self, AddOutcome, RemoveOutcome, Vip, VipError};

/// A private network namespace, held by `sh -c read` reading a pipe from us: it ends when the
/// guard drops, and also when this process dies (the pipe closes).
struct Ns {
    holder: Child,
    _stdin: Option<ChildStdin>,
}

impl Ns {
    fn new() -> Ns {
        assert!(
            std::os::unix::fs::MetadataExt::uid(&fs::metadata("/proc/self").expect("/proc/self"))
                == 0,
            "the virtual IP tests need root (network namespaces, CAP_NET_ADMIN)"
        );
        let own = fs::read_link("/proc/self/ns/net").expect("read /proc/self/ns/net");
        let mut holder = Command::new("unshare")
            .args(["--net", "--", "sh", "-c", "read -r _ || true"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot run `unshare --net` (util-linux)");
        let stdin = holder.stdin.take();
        let ns = Ns {
            holder,
            _stdin: stdin,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match fs::read_link(ns.path()) {
                Ok(l) if l != own => break,
                _ if Instant::now() > deadline => panic!("the namespace holder did not unshare"),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.holder.id()))
    }

    /// Runs a command inside the namespace; returns stdout, panics on failure.
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run nsenter");
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip"];
        full.extend_from_slice(args);
        self.run(&full)
    }

    /// Runs async `f` on a fresh thread that entered this namespace, on its own runtime.
    fn in_ns<T, F>(&self, f: impl FnOnce() -> F + Send + 'static) -> T
    where
        T: Send + 'static,
        F: std::future::Future<Output = T>,
    {
        let path = self.path();
        std::thread::spawn(move || {
            let file = fs::File::open(&path).expect("open the namespace file");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the test namespace");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let out = f().await;
                // Let the waiter of a background arping run a moment.
                tokio::time::sleep(Duration::from_millis(10)).await;
                out
            })
        })
        .join()
        .expect("thread in the namespace panicked")
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// node (interface `nodeif`, 10.200.N.1/24) <-veth-> client (`clientif`, 10.200.N.2/24).
struct Lab {
    node: Ns,
    client: Ns,
    nodeif: String,
    clientif: String,
    net: u8,
}

impl Lab {
    fn new(net: u8) -> Lab {
        let node = Ns::new();
        let client = Ns::new();
        let nodeif = format!("vipn{net}");
        let clientif = format!("vipc{net}");
        let peer_pid = client.holder.id().to_string();
        node.ip(&[
            "link", "add", &nodeif, "type", "veth", "peer", "name", &clientif, "netns", &peer_pid,
        ]);
        node.ip(&["addr", "add", &format!("10.200.{net}.1/24"), "dev", &nodeif]);
        node.ip(&["link", "set", &nodeif, "up"]);
        client.ip(&[
            "addr",
            "add",
            &format!("10.200.{net}.2/24"),
            "dev",
            &clientif,
        ]);
        client.ip(&["link", "set", &clientif, "up"]);
        Lab {
            node,
            client,
            nodeif,
            clientif,
            net,
        }
    }

    fn vip(&self) -> Vip {
        Vip::new(Ipv4Addr::new(10, 200, self.net, 100), 24).expect("valid vip")
    }

    /// The IPv4 addresses (address, prefix) on the node's interface, from `ip -j addr show`.
    fn node_addrs(&self) -> Vec<(String, u64)> {
        let out = self
            .node
            .ip(&["-j", "-4", "addr", "show", "dev", &self.nodeif]);
        let json: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
        let mut addrs = Vec::new();
        for link in json.as_array().into_iter().flatten() {
            for a in link["addr_info"].as_array().into_iter().flatten() {
                addrs.push((
                    a["local"].as_str().unwrap_or_default().to_string(),
                    a["prefixlen"].as_u64().unwrap_or_default(),
                ));
            }
        }
        addrs
    }

    fn node_has(&self, vip: Vip) -> bool {
        self.node_addrs()
            .contains(&(vip.addr.to_string(), u64::from(vip.prefix)))
    }

    fn node_mac(&self) -> String {
        let out = self.node.ip(&["-j", "link", "show", "dev", &self.nodeif]);
        let json: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
        json[0]["address"]
            .as_str()
            .expect("link address")
            .to_string()
    }

    /// The client's neighbour entry for `addr`: (lladdr, states).
    fn client_neigh(&self, addr: Ipv4Addr) -> Option<(String, Vec<String>)> {
        let a = addr.to_string();
        let out = self
            .client
            .ip(&["-j", "neigh", "show", &a, "dev", &self.clientif]);
        let json: serde_json::Value = serde_json::from_str(&out).ok()?;
        let entry = json.as_array()?.first()?;
        Some((
            entry["lladdr"].as_str().unwrap_or_default().to_string(),
            entry["state"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect(),
        ))
    }
}

#[test]
fn add_is_idempotent_and_the_garp_reaches_the_neighbour() {
    let lab = Lab::new(1);
    let vip = lab.vip();
    // The client had the VIP cached at another (old holder's) MAC, as after a failover.
    // Without the gratuitous ARP it would keep that until the entry expires.
    let old_mac = "02:00:00:00:00:01";
    lab.client.ip(&[
        "neigh",
        "replace",
        &vip.addr.to_string(),
        "lladdr",
        old_mac,
        "dev",
        &lab.clientif,
        "nud",
        "stale",
    ]);
    assert!(!lab.node_has(vip));

    let ifname = lab.nodeif.clone();
    let (first, second, present) = lab.node.in_ns(move || async move {
        let first = vip::add(vip, &ifname).await;
        let second = vip::add(vip, &ifname).await;
        let present = vip::present(vip, &ifname).await;
        (first, second, present)
    });
    assert_eq!(first.expect("first add"), AddOutcome::Added);
    assert_eq!(second.expect("second add"), AddOutcome::AlreadyPresent);
    assert!(present.expect("present"));
    assert!(lab.node_has(vip), "{:?}", lab.node_addrs());
    // Exactly one copy of it.
    let count = lab
        .node_addrs()
        .iter()
        .filter(|(a, _)| *a == vip.addr.to_string())
        .count();
    assert_eq!(count, 1);

    let mac = lab.node_mac();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let neigh = lab.client_neigh(vip.addr);
        if neigh.as_ref().map(|(l, _)| l.as_str()) == Some(mac.as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "client still has {neigh:?} for {vip}, expected {mac} after the gratuitous ARP"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn remove_is_idempotent() {
    let lab = Lab::new(2);
    let vip = lab.vip();
    let ifname = lab.nodeif.clone();
    let (added, removed, again, present) = lab.node.in_ns(move || async move {
        let added = vip::add(vip, &ifname).await;
        let removed = vip::remove(vip, &ifname).await;
        let again = vip::remove(vip, &ifname).await;
        let present = vip::present(vip, &ifname).await;
        (added, removed, again, present)
    });
    assert_eq!(added.expect("add"), AddOutcome::Added);
    assert_eq!(removed.expect("remove"), RemoveOutcome::Removed);
    assert_eq!(again.expect("second remove"), RemoveOutcome::NotPresent);
    assert!(!present.expect("present"));
    assert!(!lab.node_has(vip), "{:?}", lab.node_addrs());
    // The interface's own address is untouched.
    assert!(lab
        .node_addrs()
        .contains(&(format!("10.200.{}.1", lab.net), 24)));
}

#[test]
fn remove_if_present_clears_a_leftover_vip() {
    let lab = Lab::new(3);
    let vip = lab.vip();
    // Left behind by a daemon that was killed.
    lab.node
        .ip(&["addr", "add", &vip.to_string(), "dev", &lab.nodeif]);
    let ifname = lab.nodeif.clone();
    let (first, second, missing) = lab.node.in_ns(move || async move {
        (
            vip::remove_if_present(vip, &ifname).await,
            vip::remove_if_present(vip, &ifname).await,
            vip::remove_if_present(vip, "nosuchif3").await,
        )
    });
    assert!(first.expect("first"));
    assert!(!second.expect("second"));
    assert!(!missing.expect("a missing interface holds no address"));
    assert!(!lab.node_has(vip));
}

#[test]
fn missing_interface_is_an_error_naming_it() {
    let lab = Lab::new(4);
    let vip = lab.vip();
    let (add, remove, present) = lab.node.in_ns(move || async move {
        (
            vip::add(vip, "nosuchif4").await,
            vip::remove(vip, "nosuchif4").await,
            vip::present(vip, "nosuchif4").await,
        )
    });
    for result in [add.map(|_| ()), remove.map(|_| ()), present.map(|_| ())] {
        let err = result.expect_err("missing interface");
        assert!(
            matches!(err, VipError::NoInterface { ref ifname } if ifname == "nosuchif4"),
            "{err:?}"
        );
        assert!(err.to_string().contains("nosuchif4"), "{err}");
    }
}

#[test]
fn same_address_with_another_prefix_is_refused() {
    let lab = Lab::new(5);
    let vip = lab.vip();
    let other = format!("{}/16", vip.addr);
    lab.node.ip(&["addr", "add", &other, "dev", &lab.nodeif]);
    let ifname = lab.nodeif.clone();
    let (add, remove) = lab.node.in_ns(move || async move {
        (
            vip::add(vip, &ifname).await,
            vip::remove(vip, &ifname).await,
        )
    });
    for result in [add.map(|_| ()), remove.map(|_| ())] {
        let err = result.expect_err("prefix conflict");
        assert!(
            matches!(
                err,
                VipError::PrefixConflict {
                    present: 16,
                    wanted: 24,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    // Neither touched the operator's address.
    assert!(lab.node_addrs().contains(&(vip.addr.to_string(), 16)));
}

#[test]
fn namespace_holder_ends_when_its_pipe_closes() {
    // The cleanup path the guards rely on when a test process dies: closing the pipe ends the
    // holder, and with it the namespace and its veth.
    let mut ns = Ns::new();
    if let Some(mut stdin) = ns._stdin.take() {
        let _ = stdin.write_all(b"\n");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Some(_)) = ns.holder.try_wait() {
            break;
        }
        assert!(Instant::now() < deadline, "holder did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}
