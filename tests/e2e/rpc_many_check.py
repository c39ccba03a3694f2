#!/usr/bin/env python3
"""Eight `cella rpc` processes started at once, each creating its sandbox at
the same moment: each must get a sandbox of its own (eight distinct IDs,
each exec and file answered by its own guest), `cella ps` lists all eight,
and closing them leaves none.

Usage: rpc_many_check.py CELLA_BINARY   (CELLA_HOME from the environment)
Exits non-zero with a message on the first failed check."""

import base64
import os
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from rpc_support import Rpc, check  # noqa: E402
import rpc_support  # noqa: E402

CELLA = sys.argv[1]
COUNT = 8
TIMEOUT = 600


def ps_ids():
    return rpc_support.ps_ids(CELLA)


clients = [Rpc(CELLA) for _ in range(COUNT)]
results = [None] * COUNT
start = threading.Barrier(COUNT)


def drive(i):
    try:
        start.wait()
        made = clients[i].request("create", {"image": "@builtin",
                                          "resources": {"cpus": 1, "memory_mb": 160}})
        marker = f"client-{i}".encode()
        clients[i].request("write_file", {"path": "/tmp/who",
                                       "content": base64.b64encode(marker).decode()})
        ran = clients[i].request("exec", {"command": "cat /tmp/who; echo; hostname"})
        results[i] = (made["id"], base64.b64decode(ran["stdout"]).decode())
    except Exception as e:  # reported below with the others
        results[i] = e


threads = [threading.Thread(target=drive, args=(i,)) for i in range(COUNT)]
for t in threads:
    t.start()
for t in threads:
    t.join(TIMEOUT)
for i, r in enumerate(results):
    check(isinstance(r, tuple), f"client {i}: {r!r}")
ids = [r[0] for r in results]
check(len(set(ids)) == COUNT, f"sandbox IDs are not distinct: {ids}")
for i, (sandbox_id, out) in enumerate(results):
    lines = out.split("\n")
    # Each guest holds only its own client's file, and names itself by its own ID.
    check(lines[0] == f"client-{i}", f"client {i} read another sandbox's file: {out!r}")
    check(sandbox_id.startswith(lines[1]) or lines[1].startswith(sandbox_id[:12]),
          f"client {i}: hostname {lines[1]!r} is not its sandbox {sandbox_id}")
listed = ps_ids()
check(set(ids) <= listed, f"ps does not list all eight: {listed}")

closers = [threading.Thread(target=c.request, args=("close", {})) for c in clients]
for t in closers:
    t.start()
for t in closers:
    t.join(TIMEOUT)
for c in clients:
    c.proc.stdin.close()
    c.proc.wait(120)
left = set(ids) & ps_ids()
check(not left, f"sandboxes left after close: {left}")
print("OK", flush=True)
