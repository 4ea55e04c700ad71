//! The control socket: how the operator's commands talk to the running daemon. One JSON
//! request per connection, one JSON response (`{"ok":true,"result":…}` or
//! `{"ok":false,"error":"…"}`), so it is easy to drive from scripts with `socat` too.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::config;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Promote {
        volume: String,
        force: bool,
    },
    Demote {
        volume: String,
        #[serde(default)]
        force: bool,
    },
    Swap {
        group: String,
        /// Withdraw a pending request instead.
        #[serde(default)]
        cancel: bool,
    },
    Takeover {
        group: String,
    },
    Resolve {
        volume: String,
        discard_on: String,
        dry_run: bool,
    },
    Verify {
        volume: String,
    },
}

/// Sends one request to the daemon of `config` and returns its result.
pub fn call(
    config_path: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> anyhow::Result<serde_json::Value> {
    let cfg = config::load(config_path)?;
    call_socket(&cfg.control_socket, req, timeout)
}

pub fn call_socket(
    socket: &PathBuf,
    req: &Request,
    timeout: Option<Duration>,
) -> anyhow::Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the daemon at {} (is `nbdmirror serve` running with this config?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(timeout)?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut resp = String::new();
    BufReader::new(&s)
        .read_line(&mut resp)
        .context("no answer from the daemon")?;
    if resp.is_empty() {
        bail!("the daemon closed the control connection without answering");
    }
    let v: serde_json::Value =
        serde_json::from_str(&resp).context("unreadable answer from the daemon")?;
    if v.get("ok").and_then(|o| o.as_bool()) == Some(true) {
        Ok(v.get("result").cloned().unwrap_or(serde_json::Value::Null))
    } else {
        let e = v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("unknown error");
        bail!("{e}")
    }
}

#[derive(Args, Debug)]
pub struct ConfigArg {
    /// The node's config file (the same one `nbdmirror serve` runs with).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
#[command(
    about = "Show each volume's role, peer, sync state, generation and dirty bytes, and each failover group's state",
    after_help = "JSON keys (top level): node, peer_address, volumes, groups.\n\
        Per element of `volumes`: name, role, peer, peer_node (null while disconnected), sync, \
        size, dirty_bytes, hot_extents, resync_bytes_sent and resync_bytes_received (totals \
        since the daemon started), resync_bytes_left, resync_eta_seconds, generation, \
        metadata, consistent, reason.\n\
        Per element of `groups` (empty without [[group]] in the config): name, state, \
        primary_node, reason, round, preferred_node, volumes, vip, peer_alive, witness, \
        transitions (each at_unix, from, to, reason), last_hook_failure (null, or at_unix, \
        action, detail: the last hook that failed or could not run since the daemon started), \
        vip_problem (null, or why the virtual IP could not be added or removed)."
)]
pub struct StatusArgs {
    #[command(flatten)]
    pub c: ConfigArg,
}

#[derive(Args, Debug)]
#[command(
    about = "Make this node primary for a volume and start its NBD export",
    long_about = "Make this node primary for VOLUME and start its NBD export.\n\n\
        Refused without --force when this copy is stale (the peer holds newer data), \
        inconsistent (an unfinished resync target), empty and never mirrored while the peer is \
        away, or when the pair is in split brain. Refused even with --force while the peer is \
        connected and primary: demote it first. Promoting while the peer is unreachable is \
        allowed when this copy was in sync: make sure the other node is really down first."
)]
pub struct PromoteArgs {
    /// The volume (`[[volume]] name` in the config).
    pub volume: String,
    /// Promote even stale or inconsistent data (the peer's newer writes are then a split
    /// brain, never silently overwritten).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub c: ConfigArg,
}

#[derive(Args, Debug)]
#[command(
    about = "Stop a volume's NBD export (disconnecting its clients) and make this node secondary",
    long_about = "Stop VOLUME's NBD export and make this node secondary for it.\n\n\
        Every NBD client connected to the export is cut off, without warning: requests already \
        in flight are answered, then the connection closes and the client's next request fails (a connected qemu-io gets EIO; a guest whose QEMU has no reconnect-delay sees \
        I/O errors). Stop or detach the clients first. A volume of a failover group is demoted \
        with its group (`nbdmirror swap GROUP`), or alone with --force."
)]
pub struct DemoteArgs {
    /// The volume (`[[volume]] name` in the config).
    pub volume: String,
    /// Demote a volume that belongs to a failover group (normally only the group does).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub c: ConfigArg,
}

#[derive(Args, Debug)]
#[command(
    about = "Resolve a split brain by discarding one node's writes",
    long_about = "Resolve a split brain on VOLUME: the writes NODE made on its own are thrown \
        away and its copy is resynchronised from the other node (only the regions either side \
        changed). Prints how many bytes of NODE's writes are discarded. NODE must be secondary. \
        Both daemons must be running and connected."
)]
pub struct ResolveArgs {
    /// The volume in split brain (`[[volume]] name` in the config).
    pub volume: String,
    /// The node whose writes are thrown away: this node's name or its peer's (`node` in
    /// their configs).
    #[arg(long, value_name = "NODE")]
    pub discard_on: String,
    /// Only print what would be discarded.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub c: ConfigArg,
}

#[derive(Args, Debug)]
#[command(
    about = "Compare both copies of a volume by checksum, online",
    long_about = "Compare both copies of VOLUME block by block (BLAKE3 of 1 MiB blocks) while \
        it stays in use. Differing blocks are marked dirty and resynchronised from the \
        primary. Exit status: 0 identical, 1 differences found, 2 the comparison failed \
        (e.g. the peer is not connected)."
)]
pub struct VerifyArgs {
    /// The volume to compare (`[[volume]] name` in the config).
    pub volume: String,
    #[command(flatten)]
    pub c: ConfigArg,
}

fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let v = call(&a.c.config, &Request::Status, Some(Duration::from_secs(30)))?;
    if a.c.json {
        return print_json(&v);
    }
    print!("{}", status_text(&v));
    Ok(())
}

/// The human form of a status answer.
fn status_text(v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let s = |v: &serde_json::Value, k: &str| {
        v.get(k)
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .unwrap_or_default()
    };
    let u = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node {} (peer address {})",
        s(v, "node"),
        s(v, "peer_address")
    );
    let _ = writeln!(
        o,
        "{:<16} {:<10} {:<13} {:<12} {:>11}  GENERATION",
        "VOLUME", "ROLE", "PEER", "SYNC", "DIRTY"
    );
    for vol in v
        .get("volumes")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
    {
        let _ = writeln!(
            o,
            "{:<16} {:<10} {:<13} {:<12} {:>11}  {}",
            s(vol, "name"),
            s(vol, "role"),
            s(vol, "peer"),
            s(vol, "sync"),
            human_bytes(u(vol, "dirty_bytes")),
            s(vol, "generation")
        );
        if s(vol, "sync") == "syncing" {
            // DIRTY is this node's dirty map: a copied region stays in it until the data is
            // on the target's disk (the source clears it at the target's next flush), so it
            // may stay above what is left to copy.
            let eta = vol.get("resync_eta_seconds").and_then(|x| x.as_u64());
            let _ = writeln!(
                o,
                "    resync: {} left to copy{} (DIRTY drops only once copied data is on the target's disk)",
                human_bytes(u(vol, "resync_bytes_left")),
                eta.map(|e| format!(", about {e} s")).unwrap_or_default()
            );
        }
        let _ = writeln!(
            o,
            "    copy {}; resync since the daemon started: sent {}, received {}",
            if vol.get("consistent").and_then(|x| x.as_bool()) == Some(true) {
                "consistent"
            } else {
                "INCONSISTENT"
            },
            human_bytes(u(vol, "resync_bytes_sent")),
            human_bytes(u(vol, "resync_bytes_received")),
        );
        let _ = writeln!(o, "    {}", s(vol, "reason"));
    }
    let groups: Vec<&serde_json::Value> = v
        .get("groups")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
        .collect();
    if !groups.is_empty() {
        let _ = writeln!(
            o,
            "{:<16} {:<10} {:<16} {:<6} WITNESS",
            "GROUP", "STATE", "PRIMARY", "PEER"
        );
    }
    for g in groups {
        let name = s(g, "name");
        let primary = match g.get("primary_node").and_then(|p| p.as_str()) {
            Some(p) if p == s(v, "node") => format!("{p} (here)"),
            Some(p) => p.to_string(),
            None => "none".into(),
        };
        let _ = writeln!(
            o,
            "{:<16} {:<10} {:<16} {:<6} {}",
            name,
            s(g, "state"),
            primary,
            if g.get("peer_alive").and_then(|x| x.as_bool()) == Some(true) {
                "alive"
            } else {
                "dead"
            },
            s(g, "witness")
        );
        // The daemon's reason, as `--json` carries it: when the group never fails over by
        // itself it says so and names `nbdmirror takeover GROUP`, here with the group's name.
        let reason = s(g, "reason").replace("takeover GROUP`", &format!("takeover {name}`"));
        if !reason.is_empty() {
            let _ = writeln!(o, "    {reason}");
        }
        if let Some(p) = g.get("vip_problem").and_then(|p| p.as_str()) {
            let _ = writeln!(o, "    virtual IP: {p}");
        }
        if let Some(f) = g.get("last_hook_failure").filter(|f| !f.is_null()) {
            let ago = f
                .get("at_unix")
                .and_then(|t| t.as_u64())
                .and_then(|t| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()?
                        .as_secs();
                    Some(format!("{} s ago", now.saturating_sub(t)))
                })
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "    last failed hook: {} ({ago}): {}",
                s(f, "action"),
                s(f, "detail")
            );
        }
    }
    o
}

pub fn promote(a: PromoteArgs) -> anyhow::Result<()> {
    let v = call(
        &a.c.config,
        &Request::Promote {
            volume: a.volume.clone(),
            force: a.force,
        },
        Some(Duration::from_secs(120)),
    )?;
    if a.c.json {
        return print_json(&v);
    }
    if let Some(w) = v.get("warning").and_then(|w| w.as_str()) {
        eprintln!("warning: {w}");
    }
    println!("{}: primary on this node", a.volume);
    Ok(())
}

pub fn demote(a: DemoteArgs) -> anyhow::Result<()> {
    // The role before, only for the message: the daemon's demotion of a secondary does
    // nothing and succeeds. Without an answer the demotion below reports the problem.
    let before = call(&a.c.config, &Request::Status, Some(Duration::from_secs(30)))
        .ok()
        .and_then(|st| role_of(&st, &a.volume));
    let v = call(
        &a.c.config,
        &Request::Demote {
            volume: a.volume.clone(),
            force: a.force,
        },
        Some(Duration::from_secs(120)),
    )?;
    if a.c.json {
        return print_json(&v);
    }
    println!("{}", demote_text(&a.volume, before.as_deref()));
    Ok(())
}

/// The role of `volume` in a status answer.
fn role_of(status: &serde_json::Value, volume: &str) -> Option<String> {
    status_entry(status, "volumes", volume)?
        .get("role")?
        .as_str()
        .map(str::to_string)
}

/// The element named `name` of a status answer's `list` ("volumes" or "groups").
fn status_entry<'a>(
    status: &'a serde_json::Value,
    list: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    status
        .get(list)?
        .as_array()?
        .iter()
        .find(|v| v.get("name").and_then(|n| n.as_str()) == Some(name))
}

/// What a successful demotion says, given the role the volume had before.
fn demote_text(volume: &str, role_before: Option<&str>) -> String {
    if role_before == Some("secondary") {
        format!("{volume}: already secondary on this node (nothing to do)")
    } else {
        format!(
            "{volume}: secondary on this node (export stopped: any NBD clients connected to \
             it were disconnected)"
        )
    }
}

pub fn resolve(a: ResolveArgs) -> anyhow::Result<()> {
    let v = call(
        &a.c.config,
        &Request::Resolve {
            volume: a.volume.clone(),
            discard_on: a.discard_on.clone(),
            dry_run: a.dry_run,
        },
        Some(Duration::from_secs(120)),
    )?;
    if a.c.json {
        return print_json(&v);
    }
    let bytes = v
        .get("discarded_bytes")
        .and_then(|b| b.as_u64())
        .unwrap_or(0);
    if a.dry_run {
        println!(
            "{}: would discard {} ({bytes} bytes) written on {} during the split brain (dry run: nothing changed)",
            a.volume, human_bytes(bytes), a.discard_on
        );
    } else {
        println!(
            "{}: discarding {} ({bytes} bytes) written on {} during the split brain; resyncing it from its peer",
            a.volume, human_bytes(bytes), a.discard_on
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
#[command(
    about = "Move a failover group to the other node, with no data loss (cuts off its NBD clients)",
    long_about = "Move GROUP to the other node: wait until the peer is in sync, then stop the VM \
        (stop hook), remove the virtual IP, flush and demote here, promote there, add the \
        virtual IP there and start the VM (start hook). Works from either node. Waits until the \
        group is primary on the other node (at most --timeout seconds). If the peer does not get \
        in sync in time, the request is withdrawn and the command fails, so the group never \
        moves long after you gave up; a handover already under way is waited for instead. \
        `--cancel` withdraws a request still pending on this node (one made with `--no-wait`); \
        its JSON says `withdrawn` and `too_late`.\n\n\
        The group's NBD exports stop on the node that held it: clients connected to them there \
        are cut off without warning (a connected qemu-io gets EIO). Clients that reach the \
        exports through the group's virtual IP and reconnect (QEMU's reconnect-delay) carry on \
        with the other node; stop or detach the others first."
)]
pub struct SwapArgs {
    /// The failover group (`[[group]] name` in the config).
    pub group: String,
    /// Give up after this many seconds and withdraw the request.
    #[arg(long, default_value_t = 120, conflicts_with_all = ["no_wait", "cancel"])]
    pub timeout: u64,
    /// Ask and return at once; the request stays pending until the peer is ready, it is
    /// withdrawn with --cancel, or 10 minutes pass.
    #[arg(long, conflicts_with = "cancel")]
    pub no_wait: bool,
    /// Withdraw a swap asked on this node that has not happened yet.
    #[arg(long, conflicts_with = "no_wait")]
    pub cancel: bool,
    #[command(flatten)]
    pub c: ConfigArg,
}

pub fn swap(a: SwapArgs) -> anyhow::Result<()> {
    let ask = |cancel: bool| {
        call(
            &a.c.config,
            &Request::Swap {
                group: a.group.clone(),
                cancel,
            },
            Some(Duration::from_secs(30)),
        )
    };
    let text = |v: &serde_json::Value, default: &str| {
        v.get("action")
            .and_then(|x| x.as_str())
            .unwrap_or(default)
            .to_string()
    };
    if a.cancel {
        let r = ask(true)?;
        if a.c.json {
            return print_json(&r);
        }
        println!("{}: {}", a.group, text(&r, "done"));
        return Ok(());
    }
    let primary_of = |v: &serde_json::Value| {
        status_entry(v, "groups", &a.group)
            .and_then(|g| g.get("primary_node"))
            .and_then(|p| p.as_str())
            .map(str::to_string)
    };
    let before = call(&a.c.config, &Request::Status, Some(Duration::from_secs(30)))?;
    let from = primary_of(&before);
    let r = ask(false)?;
    if a.no_wait {
        if a.c.json {
            return print_json(&r);
        }
        println!(
            "{}: {} (pending until the peer is ready; `nbdmirror swap {} --cancel` withdraws it)",
            a.group,
            text(&r, "swap requested"),
            a.group
        );
        return Ok(());
    }
    // Polls the status until another node holds the group (its name); else the last status.
    let wait_moved =
        |for_how_long: Duration| -> anyhow::Result<Result<String, Option<serde_json::Value>>> {
            let deadline = std::time::Instant::now() + for_how_long;
            loop {
                let now = call(&a.c.config, &Request::Status, Some(Duration::from_secs(30)))?;
                let p = primary_of(&now);
                if let Some(p) = p.filter(|p| Some(p) != from.as_ref()) {
                    return Ok(Ok(p));
                }
                if std::time::Instant::now() >= deadline {
                    return Ok(Err(Some(now)));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        };
    let moved = |to: String| -> anyhow::Result<()> {
        if a.c.json {
            return print_json(
                &serde_json::json!({"group": a.group, "from": from, "to": to, "moved": true}),
            );
        }
        println!(
            "{}: moved from {} to {to}",
            a.group,
            from.as_deref().unwrap_or("-")
        );
        Ok(())
    };
    let last = match wait_moved(Duration::from_secs(a.timeout))? {
        Ok(to) => return moved(to),
        Err(last) => last,
    };
    // Withdraw the request: a group that moves minutes after the operator saw this fail
    // would surprise them. Unless a handover has begun: then it goes on (stop hook, VIP,
    // demotion, promotion there), and this waits for it rather than report a failure.
    let withdrawn = ask(true);
    let too_late = withdrawn
        .as_ref()
        .ok()
        .and_then(|v| v.get("too_late"))
        .and_then(|x| x.as_bool())
        .unwrap_or(false);
    let grace = if too_late {
        HANDOVER_GRACE
    } else {
        // A handover that began on the peer just before the withdrawal shows within a few
        // heartbeats.
        Duration::from_secs(3)
    };
    let last = match wait_moved(grace)? {
        Ok(to) => return moved(to),
        Err(now) => now.or(last),
    };
    let status = last
        .as_ref()
        .and_then(|v| v.get("groups"))
        .cloned()
        .unwrap_or_default();
    let withdrawn_text = match &withdrawn {
        Ok(v) => text(v, "swap request withdrawn"),
        Err(e) => format!(
            "the request could not be withdrawn ({e}); `nbdmirror swap {} --cancel` retries",
            a.group
        ),
    };
    if a.c.json {
        print_json(&serde_json::json!({
            "group": a.group,
            "from": from,
            "moved": false,
            "withdrawn": withdrawn.as_ref().ok().and_then(|v| v.get("withdrawn")).cloned().unwrap_or(serde_json::Value::Bool(false)),
            "message": withdrawn_text,
            "groups": status,
        }))?;
    }
    anyhow::bail!(
        "{}: {} but the group did not move within {} s (is the peer in sync? see `nbdmirror status`); {withdrawn_text}; status: {status}",
        a.group,
        text(&r, "swap requested"),
        a.timeout
    )
}

#[derive(Args, Debug)]
#[command(
    about = "Start a group here while its peer is down, in a group without witness or fence hook",
    long_about = "Start GROUP on this node (promote its volumes, add the virtual IP, run the \
        start hook) while the peer is down, in a group that never fails over by itself (no \
        witness and no fence hook). You vouch that the peer is really down (powered off, or \
        its daemon and VM stopped): if it still runs the VM, both would write. Refused while \
        the peer's heartbeats arrive (use `swap`), in groups with a witness or fence hook, and \
        when this node's copy may be stale (it was not in sync when the peer was lost: then \
        only `promote VOLUME --force` per volume, your decision). Waits until the group is \
        primary here (at most --timeout seconds)."
)]
pub struct TakeoverArgs {
    /// The failover group (`[[group]] name` in the config).
    pub group: String,
    /// Give up waiting after this many seconds (the request lapses after 60 s).
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    #[command(flatten)]
    pub c: ConfigArg,
}

pub fn takeover(a: TakeoverArgs) -> anyhow::Result<()> {
    let r = call(
        &a.c.config,
        &Request::Takeover {
            group: a.group.clone(),
        },
        Some(Duration::from_secs(30)),
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(a.timeout);
    loop {
        let st = call(&a.c.config, &Request::Status, Some(Duration::from_secs(30)))?;
        let group = status_entry(&st, "groups", &a.group)
            .cloned()
            .unwrap_or_default();
        let state = group.get("state").and_then(|s| s.as_str()).unwrap_or("");
        if matches!(state, "primary" | "alone") {
            if a.c.json {
                return print_json(
                    &serde_json::json!({"group": a.group, "state": state, "taken": true}),
                );
            }
            println!("{}: taken over here ({state})", a.group);
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let reason = group.get("reason").and_then(|s| s.as_str()).unwrap_or("");
            anyhow::bail!(
                "{}: {} but the group is not primary here after {} s: {state}: {reason}",
                a.group,
                r.get("action")
                    .and_then(|x| x.as_str())
                    .unwrap_or("takeover requested"),
                a.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// How long `swap` still waits for a handover that had begun when it gave up (the stop hook
/// alone may take its whole timeout).
const HANDOVER_GRACE: Duration = Duration::from_secs(180);

/// Returns whether the copies matched.
pub fn verify(a: VerifyArgs) -> anyhow::Result<bool> {
    let v = call(
        &a.c.config,
        &Request::Verify {
            volume: a.volume.clone(),
        },
        None,
    )?;
    let differing = v
        .get("differing_bytes")
        .and_then(|b| b.as_u64())
        .unwrap_or(0);
    if a.c.json {
        print_json(&v)?;
    } else if differing == 0 {
        println!(
            "{}: both copies are identical ({} compared)",
            a.volume,
            human_bytes(
                v.get("compared_bytes")
                    .and_then(|b| b.as_u64())
                    .unwrap_or(0)
            )
        );
    } else {
        println!(
            "{}: the copies DIFFER in {} ({differing} bytes); those regions are marked dirty and resynced from the primary",
            a.volume,
            human_bytes(differing)
        );
    }
    Ok(differing == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::collections::BTreeSet;

    /// Every key of an object, nested objects and the first element of arrays included.
    fn keys(v: &serde_json::Value, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    out.insert(k.clone());
                    keys(x, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| keys(x, out)),
            _ => {}
        }
    }

    /// The status answer the daemon builds (serve.rs: NodeStatus plus `groups`).
    fn real_status() -> serde_json::Value {
        let vol = mirror::volume::VolumeStatus {
            name: "disk0".into(),
            role: "primary",
            peer: "connected",
            peer_node: Some("node-b".into()),
            sync: "syncing",
            dirty_bytes: 40 << 20,
            resync_bytes_sent: 300 << 20,
            resync_bytes_received: 0,
            resync_bytes_left: 12 << 20,
            resync_eta_seconds: Some(3),
            generation: "00000000000000aa".into(),
            metadata: "/s/disk0.meta".into(),
            consistent: true,
            size: 1 << 30,
            hot_extents: 2,
            reason: "resync to the peer (changed regions)".into(),
        };
        let node = mirror::node::NodeStatus {
            node: "node-a".into(),
            peer_address: "127.0.0.1:7802".into(),
            volumes: vec![vol],
        };
        let group = failover::driver::GroupStatus {
            name: "vm1".into(),
            state: "primary",
            primary_node: Some("node-a".into()),
            reason: String::new(),
            round: 1,
            preferred_node: "node-a".into(),
            volumes: vec!["disk0".into()],
            vip: None,
            peer_alive: true,
            witness: "none",
            transitions: vec![failover::driver::Transition {
                at_unix: 1,
                from: "secondary",
                to: "primary",
                reason: String::new(),
            }],
            last_hook_failure: Some(failover::driver::HookFailure {
                at_unix: 1,
                action: "stop",
                detail: "exit code 1; stderr: ".into(),
            }),
            vip_problem: Some("cannot add 10.0.0.1/24 on eth9: no such interface".into()),
        };
        let mut v = serde_json::to_value(node).unwrap();
        v["groups"] = serde_json::to_value(vec![group]).unwrap();
        v
    }

    #[test]
    fn status_help_lists_every_json_key() {
        let mut cli = crate::Cli::command();
        let help = cli
            .find_subcommand_mut("status")
            .unwrap()
            .get_after_help()
            .unwrap()
            .to_string();
        let words: BTreeSet<&str> = help
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .collect();
        let mut all = BTreeSet::new();
        keys(&real_status(), &mut all);
        let missing: Vec<_> = all.iter().filter(|k| !words.contains(k.as_str())).collect();
        assert!(missing.is_empty(), "status --help lacks {missing:?}");
    }

    #[test]
    fn every_positional_argument_has_a_description() {
        fn check(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_positionals() {
                let described = a.get_help().map(|h| !h.to_string().trim().is_empty());
                if described != Some(true) {
                    missing.push(format!("{path} <{}>", a.get_id()));
                }
            }
            // Hidden commands (the witness's debugging client) are not for operators.
            for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
                check(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        check(&crate::Cli::command(), "nbdmirror", &mut missing);
        assert!(missing.is_empty(), "no help for {missing:?}");
    }

    #[test]
    fn status_text_says_what_dirty_and_left_count_and_since_when() {
        let t = status_text(&real_status());
        assert!(t.contains("40.0 MiB"), "{t}");
        assert!(t.contains("12.0 MiB left to copy, about 3 s"), "{t}");
        assert!(t.contains("DIRTY drops only once"), "{t}");
        assert!(
            t.contains("resync since the daemon started: sent 300.0 MiB, received 0 B"),
            "{t}"
        );
    }

    #[test]
    fn demoting_a_secondary_says_so() {
        let st = real_status();
        assert_eq!(role_of(&st, "disk0").as_deref(), Some("primary"));
        assert_eq!(role_of(&st, "disk9"), None);
        let stopped = "disk0: secondary on this node (export stopped: any NBD clients \
                       connected to it were disconnected)";
        assert_eq!(demote_text("disk0", Some("primary")), stopped);
        assert_eq!(
            demote_text("disk0", Some("secondary")),
            "disk0: already secondary on this node (nothing to do)"
        );
        assert_eq!(demote_text("disk0", None), stopped);
    }

    /// What a sysadmin reads in `demote --help` and `swap --help`: that connected clients
    /// are cut off.
    #[test]
    fn demote_and_swap_help_say_clients_are_cut_off() {
        let mut cli = crate::Cli::command();
        for name in ["demote", "swap"] {
            let sub = cli.find_subcommand_mut(name).unwrap();
            let long = sub.get_long_about().unwrap().to_string();
            assert!(
                long.contains("cut off") && long.contains("EIO"),
                "{name} --help: {long}"
            );
            let short = sub.get_about().unwrap().to_string();
            assert!(
                short.contains("disconnecting its clients") || short.contains("cuts off"),
                "{name} -h: {short}"
            );
        }
    }

    /// The reason a group without witness or fence hook gives while its peer is dead, from
    /// the group's own rule (the text `status --json` carries).
    fn no_quorum_reason() -> String {
        use failover::group::{decide, DataState, Decision, Facts, GroupState, Witness};
        let d = decide(&Facts {
            state: GroupState::Secondary,
            round: 1,
            is_preferred: false,
            auto_failback: false,
            data: DataState::InSyncWhenLost,
            peer: None,
            witness: Witness::None,
            fence_configured: false,
            peer_silent_long: true,
            peer_fenced: false,
            vm_failed: false,
            swap_requested: false,
            handing_over: false,
            operator_takeover: false,
        });
        match d {
            Decision::Stay { reason, .. } => reason,
            other => panic!("a group without quorum must wait: {other:?}"),
        }
    }

    #[test]
    fn status_text_shows_each_group() {
        let st = real_status();
        let t = status_text(&st);
        let lines: Vec<&str> = t.lines().collect();
        // The volume lines come first, unchanged.
        assert!(lines[1].starts_with("VOLUME "), "{t}");
        assert!(lines[2].starts_with("disk0 "), "{t}");
        let head = lines
            .iter()
            .position(|l| l.starts_with("GROUP "))
            .unwrap_or_else(|| panic!("no group section: {t}"));
        for col in ["STATE", "PRIMARY", "PEER", "WITNESS"] {
            assert!(lines[head].contains(col), "{t}");
        }
        let row: Vec<&str> = lines[head + 1].split_whitespace().collect();
        assert_eq!(
            row,
            ["vm1", "primary", "node-a", "(here)", "alive", "none"],
            "{t}"
        );

        // node-b, its peer dead, in a group that never fails over by itself: the daemon's
        // reason, takeover hint included, with the group's name in the command.
        let mut st = real_status();
        st["node"] = "node-b".into();
        let g = &mut st["groups"][0];
        g["state"] = "waiting".into();
        g["primary_node"] = serde_json::Value::Null;
        g["peer_alive"] = false.into();
        let reason = no_quorum_reason();
        assert!(reason.contains("`nbdmirror takeover GROUP`"), "{reason}");
        g["reason"] = reason.clone().into();
        let t = status_text(&st);
        let lines: Vec<&str> = t.lines().collect();
        let head = lines.iter().position(|l| l.starts_with("GROUP ")).unwrap();
        let row: Vec<&str> = lines[head + 1].split_whitespace().collect();
        assert_eq!(row, ["vm1", "waiting", "none", "dead", "none"], "{t}");
        assert_eq!(
            lines[head + 2].trim(),
            reason.replace("takeover GROUP`", "takeover vm1`"),
            "{t}"
        );
        assert!(t.contains("`nbdmirror takeover vm1`"), "{t}");

        // No [[group]]: no group section.
        let mut st = real_status();
        st["groups"] = serde_json::json!([]);
        assert!(!status_text(&st).contains("GROUP"));
    }
}
