#!/usr/bin/env python3
"""`cella rpc` vs the CLI, in one run on one image (bench/README.md):

  - exec round trip of `true`: median of N through raw JSON-RPC, through the
    Python SDK (sdk/python), and through `cella exec` on a detached sandbox;
  - create-to-first-exec through rpc beside `cella run --rm IMAGE -- true`.

Usage: bench/rpc_bench.py CELLA_BINARY IMAGE [N=100]"""

import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "sdk", "python"))
from cella import Sandbox  # noqa: E402

CELLA, IMAGE = sys.argv[1], sys.argv[2]
N = int(sys.argv[3]) if len(sys.argv) > 3 else 100


def ms(seconds):
    return f"{seconds * 1000:.1f} ms"


class Raw:
    def __init__(self):
        self.p = subprocess.Popen([CELLA, "rpc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.n = 0

    def call(self, method, params):
        self.n += 1
        self.p.stdin.write((json.dumps({"jsonrpc": "2.0", "id": self.n, "method": method, "params": params}) + "\n").encode())
        while True:
            msg = json.loads(self.p.stdout.readline())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]


# Warm the image cache so neither side pays for the pull.
subprocess.run([CELLA, "pull", IMAGE], check=False, capture_output=True)  # may be cached already

t0 = time.monotonic()
raw = Raw()
raw.call("create", {"image": IMAGE})
raw.call("exec", {"command": "true"})
rpc_first = time.monotonic() - t0
samples = []
for _ in range(N):
    t = time.monotonic()
    raw.call("exec", {"command": "true"})
    samples.append(time.monotonic() - t)
rpc_exec = statistics.median(samples)
raw.call("close", {})
raw.p.wait(60)

with Sandbox.create(IMAGE, cella_bin=CELLA) as sb:
    samples = []
    for _ in range(N):
        t = time.monotonic()
        sb.exec("true")
        samples.append(time.monotonic() - t)
    sdk_exec = statistics.median(samples)

t0 = time.monotonic()
subprocess.run([CELLA, "run", "--rm", "--image", IMAGE, "--", "true"], check=True, capture_output=True)
run_once = time.monotonic() - t0
sid = subprocess.run([CELLA, "run", "-d", "--image", IMAGE, "--", "sleep", "infinity"], check=True, capture_output=True).stdout.decode().strip()
try:
    samples = []
    for _ in range(N):
        t = time.monotonic()
        subprocess.run([CELLA, "exec", sid, "--", "true"], check=True, capture_output=True)
        samples.append(time.monotonic() - t)
    cli_exec = statistics.median(samples)
finally:
    subprocess.run([CELLA, "rm", "-f", sid], capture_output=True)

print(f"exec `true`, median of {N}:")
print(f"  rpc (raw JSON-RPC)   {ms(rpc_exec)}")
print(f"  Python SDK           {ms(sdk_exec)}")
print(f"  cella exec (CLI)     {ms(cli_exec)}   ({cli_exec / rpc_exec:.1f}x rpc)")
print("create to first exec:")
print(f"  rpc create + exec    {ms(rpc_first)}")
print(f"  cella run --rm true  {ms(run_once)}")
