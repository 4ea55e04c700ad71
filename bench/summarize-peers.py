#!/usr/bin/env python3
"""Summarise a bench/run-peers.sh results folder as Markdown (stdout). Standard library only.

Reads OUTDIR/meta.md and OUTDIR/roundN/SERVER.txt (`name value unit` lines from bench-nbd.sh).

For every figure: the median over rounds for each server, and the ratio nbdmirror / best peer
computed within each round, then the median (and min-max) of those per-round ratios. The peers are
qemu-nbd and nbdkit-file; the best peer is the higher one for IOPS and MiB/s and the lower one for
latencies (unit us), so a ratio above 1 is a win for throughput and a loss for latency.
nbdkit-null (no disk at all) is the protocol ceiling, shown for reference and never a "peer".

Usage: summarize-peers.py OUTDIR
"""
import os
import re
import statistics
import sys

SUBJECT = "nbdmirror"
PEERS = ["qemu-nbd", "nbdkit-file"]
CEILING = "nbdkit-null"
SERVER_ORDER = [SUBJECT] + PEERS + [CEILING]
LOWER_IS_BETTER_UNITS = {"us"}


def fmt(v):
    if v is None:
        return "–"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


def fmt_ratio(v):
    return "–" if v is None else f"{v:.2f}"


def median(xs):
    return statistics.median(xs) if xs else None


def load(outdir):
    """vals[figure][server][round] = value; units[figure]; errors = [(round, server, line)]."""
    vals, units, order, errors = {}, {}, [], []
    rounds = sorted(
        int(m.group(1))
        for d in os.listdir(outdir)
        if (m := re.fullmatch(r"round(\d+)", d)) and os.path.isdir(os.path.join(outdir, d))
    )
    servers = set()
    for r in rounds:
        rdir = os.path.join(outdir, f"round{r}")
        for fn in sorted(os.listdir(rdir)):
            if not fn.endswith(".txt"):
                continue
            server = fn[: -len(".txt")]
            servers.add(server)
            with open(os.path.join(rdir, fn)) as f:
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
    # Battery order: the order in which the figures appear, which is the same for every server.
    return rounds, servers, order, units, vals, errors


def per_round_ratios(fig_vals, lower_better, rounds, denominator):
    """[(round, ratio, which)] where denominator(round) gives (value, server) or None."""
    out = []
    sub = fig_vals.get(SUBJECT, {})
    for r in rounds:
        if r not in sub:
            continue
        d = denominator(r)
        if d is None or d[0] == 0:
            continue
        out.append((r, sub[r] / d[0], d[1]))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    outdir = sys.argv[1]
    rounds, servers, figures, units, vals, errors = load(outdir)
    peers = [p for p in PEERS if p in servers]

    meta = os.path.join(outdir, "meta.md")
    if os.path.exists(meta):
        with open(meta) as f:
            print(f.read().rstrip("\n"))
        print()

    print(f"## Summary: {len(rounds)} round(s)")
    print()
    print(
        "Medians over rounds. **ratio** = nbdmirror / best peer, computed within each round, then "
        "the median (min–max) over rounds; best peer = the higher of "
        f"{' and '.join(peers) or '(no peer run)'} for IOPS and MiB/s, the lower for latencies (us). "
        "Throughput: ratio > 1 is a win. Latency: ratio < 1 is a win. **won** = rounds in which "
        f"nbdmirror beat the best peer. **vs null** = nbdmirror / {CEILING} (the protocol "
        "ceiling: no disk), per-round median."
    )
    print()
    cols = servers + ["ratio", "min–max", "won", "best peer (by round)", "vs null"]
    print("| figure | unit | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * (len(servers) + 3) + "---|---:|")

    verdicts = []
    per_round_table = []
    for fig in figures:
        unit = units[fig]
        lower = unit in LOWER_IS_BETTER_UNITS
        fv = vals[fig]
        meds = [fmt(median(list(fv.get(s, {}).values()))) for s in servers]

        def best_peer(r):
            cands = [(fv[p][r], p) for p in peers if r in fv.get(p, {})]
            if not cands:
                return None
            return min(cands) if lower else max(cands)

        def ceiling(r):
            v = fv.get(CEILING, {}).get(r)
            return None if v is None else (v, CEILING)

        rr = per_round_ratios(fv, lower, rounds, best_peer)
        ratios = [x[1] for x in rr]
        med_ratio = median(ratios)
        won = sum(1 for x in ratios if (x < 1 if lower else x > 1))
        which = ", ".join(x[2] for x in rr) or "–"
        null_ratio = median([x[1] for x in per_round_ratios(fv, lower, rounds, ceiling)])
        spread = f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "–"
        won_s = f"{won}/{len(ratios)}" if ratios else "–"
        print(
            f"| {fig} | {unit} | " + " | ".join(meds)
            + f" | **{fmt_ratio(med_ratio)}** | {spread} | {won_s} | {which} | {fmt_ratio(null_ratio)} |"
        )
        per_round_table.append((fig, {r: x for r, x, _ in rr}))
        if med_ratio is not None:
            verdicts.append((fig, unit, lower, med_ratio, won, len(ratios), rr))

    print()
    print("### Where nbdmirror loses to the best peer (median of per-round ratios)")
    print()
    losses = [v for v in verdicts if (v[3] > 1 if v[2] else v[3] < 1)]
    if not losses:
        print("- none")
    for fig, unit, lower, ratio, won, n, rr in losses:
        peers_seen = sorted({x[2] for x in rr})
        if lower:
            how = f"{(ratio - 1) * 100:.0f} % higher latency"
        else:
            how = f"{(1 - ratio) * 100:.0f} % lower {unit}"
        consistency = "every round" if won == 0 else f"won {won}/{n} rounds"
        print(f"- {fig}: ratio {ratio:.2f}, {how} than {'/'.join(peers_seen)} ({consistency})")
    print()
    print("### Where nbdmirror wins")
    print()
    wins = [v for v in verdicts if v not in losses]
    if not wins:
        print("- none")
    for fig, unit, lower, ratio, won, n, rr in wins:
        if lower:
            how = f"{(1 - ratio) * 100:.0f} % lower latency" if ratio != 1 else "equal"
        else:
            how = f"{(ratio - 1) * 100:.0f} % higher {unit}" if ratio != 1 else "equal"
        print(f"- {fig}: ratio {ratio:.2f}, {how} (won {won}/{n} rounds)")

    print()
    print("### Per-round ratios nbdmirror / best peer")
    print()
    print("| figure | " + " | ".join(f"round {r}" for r in rounds) + " |")
    print("|---|" + "---:|" * len(rounds))
    for fig, byr in per_round_table:
        print(f"| {fig} | " + " | ".join(fmt_ratio(byr.get(r)) for r in rounds) + " |")

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

    turns = []
    for r in rounds:
        for s in servers:
            p = os.path.join(outdir, f"round{r}", f"{s}.turn")
            if not os.path.exists(p):
                continue
            kv = {}
            with open(p) as f:
                for line in f:
                    k, _, v = line.strip().partition(" ")
                    kv[k] = v
            turns.append((r, s, kv))
    if turns:
        print()
        print("### Turns: machine load (1-min load average) and server shutdown")
        print()
        print("| round | server | loadavg before | loadavg after | exit status | stop s | note |")
        print("|---:|---|---|---|---:|---:|---|")
        for r, s, kv in turns:
            print(
                f"| {r} | {s} | {kv.get('loadavg_before', '–').split(' ')[0]} | "
                f"{kv.get('loadavg_after', '–').split(' ')[0]} | {kv.get('server_exit_status', '–')} | "
                f"{kv.get('server_stop_seconds', '–')} | {kv.get('note', '')} |"
            )

    if errors:
        print()
        print("### Errors")
        print()
        for r, s, line in errors:
            print(f"- round {r}, {s}: `{line}`")


if __name__ == "__main__":
    main()
