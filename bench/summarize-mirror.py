#!/usr/bin/env python3
"""Summarise a bench/run-mirror.sh results folder as Markdown (stdout). Standard library only.

Reads OUTDIR/meta.md, OUTDIR/roundN/SERVER.txt (`name value unit` lines from bench-nbd.sh) and
OUTDIR/roundN/SERVER.turn (set-up timings, status answers).

Servers: `mirror` (the nbdmirror pair, the subject), `export` (unmirrored nbdmirror export) and
`qsd-mirror` (qemu-storage-daemon, write-blocking mirror). Every ratio is computed within a
round (same round, same machine state), then the median (min-max) over rounds is reported.

Goals (issue 3, "Speed"):
  - mirror / qsd-mirror >= 2 on every throughput figure (IOPS, MiB/s) of the four tests;
  - against export: QD1 write latency (randwrite_4k_qd1, p50 and mean = 1/IOPS) <= 1.8x,
    QD32 IOPS (randwrite_4k_qd32) and sequential MiB/s (seqwrite_1m_qd8) >= 0.45x.

Usage: summarize-mirror.py OUTDIR
"""
import os
import re
import statistics
import sys

SUBJECT = "mirror"
SERVER_ORDER = ["mirror", "export", "qsd-mirror"]
LOWER_IS_BETTER_UNITS = {"us"}

# (label, how to compute per round from vals, comparison, threshold)
#   kind "ratio": mirror/other of one figure;  "inv": other/mirror of an IOPS figure (= mean
#   latency ratio at QD1, since QD1 mean latency is 1/IOPS)
GOALS = [
    ("4k randwrite QD1 IOPS vs qsd-mirror", "randwrite_4k_qd1_iops", "qsd-mirror", "ratio", ">=", 2.0),
    ("4k randwrite+FLUSH QD1 IOPS vs qsd-mirror", "randwrite_4k_qd1_flush_iops", "qsd-mirror", "ratio", ">=", 2.0),
    ("4k randwrite QD32 IOPS vs qsd-mirror", "randwrite_4k_qd32_iops", "qsd-mirror", "ratio", ">=", 2.0),
    ("1 MiB seq write MiB/s vs qsd-mirror", "seqwrite_1m_qd8_bw", "qsd-mirror", "ratio", ">=", 2.0),
    ("QD1 write latency p50 vs export", "randwrite_4k_qd1_lat_p50", "export", "ratio", "<=", 1.8),
    ("QD1 write latency mean (1/IOPS) vs export", "randwrite_4k_qd1_iops", "export", "inv", "<=", 1.8),
    ("4k randwrite QD32 IOPS vs export", "randwrite_4k_qd32_iops", "export", "ratio", ">=", 0.45),
    ("1 MiB seq write MiB/s vs export", "seqwrite_1m_qd8_bw", "export", "ratio", ">=", 0.45),
]


def fmt(v):
    if v is None:
        return "–"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


def fr(v):
    return "–" if v is None else f"{v:.2f}"


def median(xs):
    return statistics.median(xs) if xs else None


def load(outdir):
    """vals[figure][server][round] = value; units; figure order; errors; turns[(r, s)] = dict."""
    vals, units, order, errors, turns = {}, {}, [], [], {}
    rounds = sorted(
        int(m.group(1))
        for d in os.listdir(outdir)
        if (m := re.fullmatch(r"round(\d+)", d)) and os.path.isdir(os.path.join(outdir, d))
    )
    servers = set()
    for r in rounds:
        rdir = os.path.join(outdir, f"round{r}")
        for fn in sorted(os.listdir(rdir)):
            path = os.path.join(rdir, fn)
            if fn.endswith(".turn"):
                kv = {}
                with open(path) as f:
                    for line in f:
                        k, _, v = line.rstrip("\n").partition(" ")
                        if k == "note":
                            kv.setdefault("notes", []).append(v)
                        else:
                            kv[k] = v
                turns[(r, fn[: -len(".turn")])] = kv
                continue
            if not fn.endswith(".txt") or "." in fn[: -len(".txt")]:
                continue  # only SERVER.txt: the battery's figures
            server = fn[: -len(".txt")]
            servers.add(server)
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if not parts or parts[0].startswith("#"):
                        continue
                    if len(parts) != 3:
                        errors.append((r, server, f"unparsable line: {line.strip()}"))
                        continue
                    name, value, unit = parts
                    if name.endswith("_error"):
                        errors.append((r, server, line.strip()))
                        continue
                    try:
                        v = float(value)
                    except ValueError:
                        errors.append((r, server, f"unparsable value: {line.strip()}"))
                        continue
                    if name not in units:
                        units[name] = unit
                        order.append(name)
                    vals.setdefault(name, {}).setdefault(server, {})[r] = v
    known = [s for s in SERVER_ORDER if s in servers]
    servers = known + sorted(servers - set(known))
    return rounds, servers, order, units, vals, errors, turns


def per_round(vals, fig, num, den, rounds, invert=False):
    """{round: num/den} (or den/num when invert) for rounds where both exist and are non-zero."""
    out = {}
    a, b = vals.get(fig, {}).get(num, {}), vals.get(fig, {}).get(den, {})
    for r in rounds:
        if r in a and r in b and a[r] and b[r]:
            out[r] = b[r] / a[r] if invert else a[r] / b[r]
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    outdir = sys.argv[1]
    rounds, servers, figures, units, vals, errors, turns = load(outdir)

    meta = os.path.join(outdir, "meta.md")
    if os.path.exists(meta):
        with open(meta) as f:
            print(f.read().rstrip("\n"))
        print()

    have_subject = SUBJECT in servers
    print(f"## Summary: {len(rounds)} round(s)")
    print()
    print(
        "Medians over rounds per server. Ratios are computed within each round, then the median "
        "(min–max) over rounds. For IOPS and MiB/s a ratio above 1 means the first server is "
        "faster; for latencies (us) a ratio below 1 means it is faster."
    )
    if not have_subject:
        print()
        print("**The mirrored pair was not measured in this run** (no `serve` in the binary, or "
              "SERVERS left it out): only export / qsd-mirror is shown.")
    print()
    pairs = []
    if have_subject:
        pairs += [("mirror", "export"), ("mirror", "qsd-mirror")]
    elif "export" in servers and "qsd-mirror" in servers:
        pairs += [("export", "qsd-mirror")]
    cols = servers + [f"{a} / {b}" for a, b in pairs]
    print("| figure | unit | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for fig in figures:
        cells = [fmt(median(list(vals[fig].get(s, {}).values()))) for s in servers]
        for a, b in pairs:
            pr = per_round(vals, fig, a, b, rounds)
            xs = list(pr.values())
            cells.append(
                "–" if not xs else f"**{fr(median(xs))}** ({fr(min(xs))}–{fr(max(xs))})"
            )
        print(f"| {fig} | {units[fig]} | " + " | ".join(cells) + " |")

    if have_subject:
        print()
        print("### Goals of issue 3 (median of per-round ratios)")
        print()
        print("| goal | figure | ratio | min–max | goal | met | rounds meeting it |")
        print("|---|---|---:|---:|---:|---|---:|")
        for label, fig, other, kind, cmp, thr in GOALS:
            pr = per_round(vals, fig, SUBJECT, other, rounds, invert=(kind == "inv"))
            xs = list(pr.values())
            if not xs:
                print(f"| {label} | {fig} | – | – | {cmp} {thr} | not measured | – |")
                continue
            m = median(xs)
            ok = (m >= thr) if cmp == ">=" else (m <= thr)
            n_ok = sum(1 for x in xs if (x >= thr if cmp == ">=" else x <= thr))
            print(
                f"| {label} | {fig}{' (inverse)' if kind == 'inv' else ''} | **{fr(m)}** | "
                f"{fr(min(xs))}–{fr(max(xs))} | {cmp} {thr} | {'yes' if ok else '**no**'} | "
                f"{n_ok}/{len(xs)} |"
            )

    print()
    print("### Per-round ratios")
    print()
    hdr = [f"{a}/{b} r{r}" for a, b in pairs for r in rounds]
    print("| figure | " + " | ".join(hdr) + " |")
    print("|---|" + "---:|" * len(hdr))
    for fig in figures:
        cells = []
        for a, b in pairs:
            pr = per_round(vals, fig, a, b, rounds)
            cells += [fr(pr.get(r)) for r in rounds]
        print(f"| {fig} | " + " | ".join(cells) + " |")

    print()
    print("### Spread per server: median (min–max) over rounds")
    print()
    print("| figure | unit | " + " | ".join(servers) + " |")
    print("|---|---|" + "---:|" * len(servers))
    for fig in figures:
        cells = []
        for s in servers:
            xs = list(vals[fig].get(s, {}).values())
            cells.append("–" if not xs else f"{fmt(median(xs))} ({fmt(min(xs))}–{fmt(max(xs))})")
        print(f"| {fig} | {units[fig]} | " + " | ".join(cells) + " |")

    if turns:
        print()
        print("### Turns: set-up, machine load (1-min load average), shutdown")
        print()
        print("| round | server | set-up (s) | loadavg (1 min) seen around its tests | exit status | stop s | notes |")
        print("|---:|---|---|---|---|---|---|")
        for (r, s), kv in sorted(turns.items()):
            setup = ", ".join(
                f"{k[len('setup_'):].replace('_seconds', '')} {v}" for k, v in kv.items()
                if k.startswith("setup_")
            ) or "–"
            exits = ", ".join(f"{k[:-len('_exit_status')]} {v}" for k, v in kv.items() if k.endswith("_exit_status") and k != "battery_exit_status")
            stops = ", ".join(f"{v}" for k, v in kv.items() if k.endswith("_stop_seconds"))
            killed = [k[: -len("_sigkilled")] for k, v in kv.items() if k.endswith("_sigkilled") and v != "0"]
            notes = list(kv.get("notes", []))
            if killed:
                notes.append("SIGKILLed: " + ", ".join(killed))
            loads = [float(v.split(" ")[0]) for k, v in kv.items() if k.startswith("loadavg_")]
            load_s = f"{min(loads):.2f}–{max(loads):.2f}" if loads else "–"
            bad = [k for k, v in kv.items() if k.startswith("battery_exit_status") and v != "0"]
            if bad:
                notes.append("battery failed: " + ", ".join(bad))
            print(
                f"| {r} | {s} | {setup} | {load_s} | {exits or '–'} | {stops or '–'} | "
                f"{'; '.join(notes)} |"
            )

    if errors:
        print()
        print("### Errors")
        print()
        for r, s, line in errors:
            print(f"- round {r}, {s}: `{line}`")


if __name__ == "__main__":
    main()
