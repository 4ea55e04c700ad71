#!/usr/bin/env python3
# Copied unchanged from /work/shared/bench/qmp.py (the QMP client of servers.sh) so that
# bench/run-mirror.sh needs nothing outside this repository.
"""Minimal QMP client: qmp.py SOCKET CMD_JSON [--wait-event NAME [--timeout S]]
Sends qmp_capabilities, then the command; prints the reply.  With --wait-event,
then waits for that event (e.g. BLOCK_JOB_READY) and prints elapsed seconds."""
import json, socket, sys, time

def main():
    path, cmd = sys.argv[1], json.loads(sys.argv[2])
    wait_ev = None; timeout = 600.0
    a = sys.argv[3:]
    while a:
        if a[0] == '--wait-event': wait_ev = a[1]; a = a[2:]
        elif a[0] == '--timeout': timeout = float(a[1]); a = a[2:]
        else: raise SystemExit('bad arg ' + a[0])
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    f = s.makefile('rw')
    json.loads(f.readline())                      # greeting
    f.write(json.dumps({'execute': 'qmp_capabilities'}) + '\n'); f.flush()
    while 'return' not in (r := json.loads(f.readline())): pass
    t0 = time.monotonic()
    f.write(json.dumps(cmd) + '\n'); f.flush()
    while True:
        r = json.loads(f.readline())
        if 'return' in r or 'error' in r:
            print(json.dumps(r)); break
        if 'event' in r and r['event'] == wait_ev:
            print(json.dumps(r)); print(f"event_elapsed {time.monotonic()-t0:.3f} s"); wait_ev = None
    if 'error' in r: sys.exit(1)
    s.settimeout(timeout)
    while wait_ev:
        r = json.loads(f.readline())
        if r.get('event') == wait_ev:
            print(json.dumps(r)); print(f"event_elapsed {time.monotonic()-t0:.3f} s"); break
        if r.get('event') in ('BLOCK_JOB_ERROR', 'BLOCK_JOB_COMPLETED') and wait_ev == 'BLOCK_JOB_READY':
            print(json.dumps(r)); sys.exit(1)

if __name__ == '__main__':
    main()
