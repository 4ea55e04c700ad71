#!/usr/bin/env python3
"""Poll `nbdmirror status --config CFG --json` until volume conditions hold; time it.

Usage: mirror-wait.py NBDMIRROR CFG [--volume NAME] [--timeout S] [--since EPOCH] [--interval S]
                      [--log FILE --log-text TEXT --log-count N] KEY=VALUE [KEY=VALUE ...]

Conditions are on the volume's element of `volumes` (the first one unless --volume), e.g.
`peer=connected sync=in-sync role=primary`; all must hold in the same status answer. A
condition `KEY=VALUE` compares the JSON value's string form (true/false for booleans);
`KEY>=NUMBER` compares a numeric field (e.g. `resync_bytes_sent>=1048576`).

Prints, on success (exit 0):
    elapsed S          seconds from --since (a `date +%s.%N` stamp; default: this program's
                       start) to the first status answer in which every condition held
    polls N            status calls made
    first_KEY=VALUE S  for each condition, when it first held (seconds from --since)
    status JSON        the final status answer, on one line
On timeout (exit 1) the same, with `timeout S` instead of `elapsed`, and the last answer (or
the last error) on stderr. Standard library only. The poll interval defaults to 0 (back to back:
one status call costs a few ms, which is the resolution).

With --log, status is not polled until FILE holds at least N lines containing TEXT (the file is
read every 2 ms, which costs next to nothing). A timed wait should use it: on two cores, status
calls back to back (a process start each) take most of a core from the daemons being timed. The
log line is the clock; the status calls that follow confirm the state.
"""
import json
import subprocess
import sys
import time


def main():
    a = sys.argv[1:]
    if len(a) < 3:
        sys.exit(__doc__)
    binary, cfg = a[0], a[1]
    a = a[2:]
    volume, timeout, since, interval = None, 60.0, None, 0.0
    log, log_text, log_count = None, None, 1
    conds = []
    while a:
        if a[0] == "--volume":
            volume, a = a[1], a[2:]
        elif a[0] == "--timeout":
            timeout, a = float(a[1]), a[2:]
        elif a[0] == "--since":
            since, a = float(a[1]), a[2:]
        elif a[0] == "--interval":
            interval, a = float(a[1]), a[2:]
        elif a[0] == "--log":
            log, a = a[1], a[2:]
        elif a[0] == "--log-text":
            log_text, a = a[1], a[2:]
        elif a[0] == "--log-count":
            log_count, a = int(a[1]), a[2:]
        elif ">=" in a[0]:
            k, _, v = a[0].partition(">=")
            conds.append((k, ">=", float(v)))
            a = a[1:]
        elif "=" in a[0]:
            k, _, v = a[0].partition("=")
            conds.append((k, "=", v))
            a = a[1:]
        else:
            sys.exit(f"bad argument {a[0]!r}\n\n{__doc__}")
    # time.time() is the wall clock `date +%s.%N` reads, so --since stamps from the shell compare.
    t_start = time.time()
    base = since if since is not None else t_start
    first = {}
    polls, last, last_err = 0, None, ""
    if log is not None:
        if not log_text:
            sys.exit("--log needs --log-text")
        while count_lines(log, log_text) < log_count and time.time() - t_start <= timeout:
            time.sleep(0.002)
    while True:
        now = time.time()
        polls += 1
        p = subprocess.run(
            [binary, "status", "--config", cfg, "--json"], capture_output=True, text=True
        )
        t = time.time()
        if p.returncode == 0:
            try:
                st = json.loads(p.stdout)
                vols = st.get("volumes", [])
                vol = next((v for v in vols if v.get("name") == volume), None) if volume else (vols[0] if vols else None)
            except (json.JSONDecodeError, AttributeError) as e:
                vol, last_err = None, f"unparsable status: {e}: {p.stdout[:200]}"
            if vol is not None:
                last = p.stdout.strip().replace("\n", " ")
                ok = True
                for k, op, v in conds:
                    got = vol.get(k)
                    if op == ">=":
                        holds = isinstance(got, (int, float)) and not isinstance(got, bool) and got >= v
                        label = f"{k}>={v:g}"
                    else:
                        got_s = json.dumps(got) if isinstance(got, bool) or got is None else str(got)
                        holds, label = got_s == v, f"{k}={v}"
                    if holds:
                        # the answer reflects the state somewhere in [now, t]: take the midpoint
                        first.setdefault(label, (now + t) / 2 - base)
                    else:
                        ok = False
                if ok:
                    print(f"elapsed {(now + t) / 2 - base:.3f}")
                    break
        else:
            last_err = (p.stderr or p.stdout).strip()
        if t - t_start > timeout:
            print(f"timeout {t - base:.3f}")
            print(f"last status: {last}\nlast error: {last_err}", file=sys.stderr)
            print(f"polls {polls}")
            for k, v in first.items():
                print(f"first_{k} {v:.3f}")
            print(f"status {last}")
            sys.exit(1)
        if interval:
            time.sleep(interval)
    print(f"polls {polls}")
    for k, v in first.items():
        print(f"first_{k} {v:.3f}")
    print(f"status {last}")


def count_lines(path, text):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if text in line)
    except OSError:
        return 0


if __name__ == "__main__":
    main()
