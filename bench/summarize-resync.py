#!/usr/bin/env python3
"""Summarise a bench/run-resync.sh results folder as Markdown (stdout). Standard library only.

Reads OUTDIR/meta.md and OUTDIR/roundN/results.txt (`name value unit` lines; `note ...` lines).
Every ratio is computed within a round, then the median (min-max) over rounds.

Goals (issue 3, "Speed"):
  - 1 % dirty: time to in-sync < 3 % of the full resync of the same volume
    (dirty_resync_seconds / full_sync_seconds; the brief's clock starts at node-b's start,
    the issue's at reconnection: both are shown);
  - full resync at least as fast as nbdcopy between the same two hosts
    (nbdcopy_seconds / full_sync_seconds >= 1).

Usage: summarize-resync.py OUTDIR
"""
import os
import re
import statistics
import sys

RATIOS = [
    # label, numerator, denominator, goal (op, threshold) or None
    ("1 % dirty resync (from node-b's start) / full sync", "dirty_resync_seconds", "full_sync_seconds", ("<", 0.03)),
    ("1 % dirty resync (from reconnection) / full sync", "dirty_resync_after_connect_seconds", "full_sync_seconds", ("<", 0.03)),
    ("1 % dirty resync / full sync, the daemon's own took= (resync start to end)", "dirty_resync_took_seconds", "full_resync_took_seconds", ("<", 0.03)),
    ("1 % dirty resync / full sync, polling clocks (cross-check)", "dirty_resync_poll_seconds", "full_sync_poll_seconds", None),
    ("nbdcopy time / full sync time (>= 1: full sync as fast)", "nbdcopy_seconds", "full_sync_seconds", (">=", 1.0)),
    ("nbdcopy --flush time / full sync time", "nbdcopy_flush_seconds", "full_sync_seconds", (">=", 1.0)),
    ("1 % resync bytes sent / bytes written while node-b was away", "dirty_resync_bytes_sent", "dirty_written_bytes", None),
    ("dirty_bytes reported / bytes written", "dirty_bytes_reported", "dirty_written_bytes", None),
    ("full sync bytes sent / volume size", "full_resync_bytes_sent", "volume_bytes", None),
]


def median(xs):
    return statistics.median(xs) if xs else None


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    outdir = sys.argv[1]
    meta_text = ""
    meta = os.path.join(outdir, "meta.md")
    if os.path.exists(meta):
        with open(meta) as f:
            meta_text = f.read().rstrip("\n")
        print(meta_text)
        print()
    m = re.search(r"SIZE=\S+ \((\d+) bytes\)", meta_text)
    volume = float(m.group(1)) if m else None
    rounds = sorted(
        int(mm.group(1)) for d in os.listdir(outdir) if (mm := re.fullmatch(r"round(\d+)", d))
    )
    vals, units, order, notes = {}, {}, [], []
    for r in rounds:
        p = os.path.join(outdir, f"round{r}", "results.txt")
        if not os.path.exists(p):
            continue
        with open(p) as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if parts[0] == "note":
                    notes.append((r, line[5:].strip()))
                    continue
                if len(parts) != 3:
                    notes.append((r, f"unparsable: {line.strip()}"))
                    continue
                name, v, unit = parts
                try:
                    x = float(v)
                except ValueError:
                    notes.append((r, f"unparsable: {line.strip()}"))
                    continue
                if name not in units:
                    units[name] = unit
                    order.append(name)
                vals.setdefault(name, {})[r] = x
        if volume:
            vals.setdefault("volume_bytes", {})[r] = volume

    print(f"## Summary: {len(rounds)} round(s)")
    print()
    print("| figure | unit | median | min–max | " + " | ".join(f"round {r}" for r in rounds) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(rounds))

    def fmt(x):
        if x is None:
            return "–"
        if abs(x) >= 1e6:
            return f"{x / 1048576:,.1f} Mi"
        return f"{x:.3f}" if abs(x) < 100 else f"{x:,.0f}"

    for name in order:
        xs = [vals[name][r] for r in rounds if r in vals[name]]
        print(
            f"| {name} | {units[name]} | {fmt(median(xs))} | {fmt(min(xs))}–{fmt(max(xs))} | "
            + " | ".join(fmt(vals[name].get(r)) for r in rounds) + " |"
        )
    if volume and "full_sync_seconds" in vals:
        xs = [volume / 1048576 / v for v in vals["full_sync_seconds"].values() if v]
        ys = [volume / 1048576 / v for v in vals.get("nbdcopy_seconds", {}).values() if v]
        print()
        print(
            f"Full sync throughput: median {median(xs):,.0f} MiB/s"
            + (f"; nbdcopy {median(ys):,.0f} MiB/s." if ys else ".")
        )

    print()
    print("### Ratios within each round (median, min–max) and goals")
    print()
    print("| ratio | median | min–max | " + " | ".join(f"round {r}" for r in rounds) + " | goal | met |")
    print("|---|---:|---:|" + "---:|" * len(rounds) + "---|---|")
    for label, a, b, goal in RATIOS:
        per = {}
        for r in rounds:
            x, y = vals.get(a, {}).get(r), vals.get(b, {}).get(r)
            if x is not None and y:
                per[r] = x / y
        xs = list(per.values())
        if not xs:
            print(f"| {label} | – | – | " + " | ".join("–" for _ in rounds) + f" | {goal[0] + ' ' + str(goal[1]) if goal else ''} | not measured |")
            continue
        med = median(xs)
        met = ""
        if goal:
            ok = med < goal[1] if goal[0] == "<" else med >= goal[1]
            met = "yes" if ok else "**no**"
        print(
            f"| {label} | **{med:.4f}** | {min(xs):.4f}–{max(xs):.4f} | "
            + " | ".join(f"{per[r]:.4f}" if r in per else "–" for r in rounds)
            + f" | {goal[0] + ' ' + str(goal[1]) if goal else ''} | {met} |"
        )
    if notes:
        print()
        print("### Notes")
        print()
        for r, n in notes:
            print(f"- round {r}: {n}")


if __name__ == "__main__":
    main()
