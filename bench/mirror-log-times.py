#!/usr/bin/env python3
"""Times of resync events in an `nbdmirror serve` log, relative to a wall-clock stamp.

Usage: mirror-log-times.py LOG SINCE_EPOCH
SINCE_EPOCH is a `date +%s.%N` stamp taken by the caller (the daemon logs UTC wall-clock times,
so both clocks are the same). Considers only lines at or after SINCE and prints, for the first
occurrence of each event (absent events are not printed):
    log_peer_connected S       "peer connected"
    log_resync_started S       "resync to the peer started"
    log_resync_complete S      "resync to the peer complete" (after the start above)
    log_resync_took S          that line's took=... (the daemon's own duration of the resync)
Seconds from SINCE, three decimals. This reads log text (tracing's default format), not a stable
interface: callers keep their status-polling clock as the fallback.
"""
import re
import sys
from datetime import datetime


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    since = float(sys.argv[2])
    got = {}
    with open(sys.argv[1], errors="replace") as f:
        for line in f:
            m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z\s", line)
            if not m:
                continue
            ts = m.group(1)
            if "." in ts:  # fromisoformat takes at most 6 fraction digits
                a, b = ts.split(".")
                ts = a + "." + b[:6]
            t = datetime.fromisoformat(ts + "+00:00").timestamp() - since
            if t < 0:
                continue
            if "peer connected" in line:
                got.setdefault("log_peer_connected", t)
            elif "resync to the peer started" in line:
                got.setdefault("log_resync_started", t)
            elif "resync to the peer complete" in line and "log_resync_started" in got:
                if "log_resync_complete" not in got:
                    got["log_resync_complete"] = t
                    mt = re.search(r"took=Some\(([\d.]+)(ns|µs|us|ms|s)\)", line)
                    if mt:
                        scale = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}[mt.group(2)]
                        got["log_resync_took"] = float(mt.group(1)) * scale
    for k in ("log_peer_connected", "log_resync_started", "log_resync_complete", "log_resync_took"):
        if k in got:
            print(f"{k} {got[k]:.3f}")


if __name__ == "__main__":
    main()
