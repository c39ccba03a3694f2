#!/usr/bin/env python3
"""Drives `cella rpc` over raw newline-delimited JSON-RPC, as matchlock's SDKs
do, and checks every answer. One sandbox for everything; at the end the rpc
process is SIGKILLed and its sandbox must vanish (no orphan VM).

Usage: rpc_check.py CELLA_BINARY IMAGE   (CELLA_HOME from the environment)
Exits non-zero with a message on the first failed check."""

import base64
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from rpc_support import TIMEOUT, check, fail  # noqa: E402,F401
import rpc_support  # noqa: E402

CELLA, IMAGE = sys.argv[1], sys.argv[2]


def Rpc():
    return rpc_support.Rpc(CELLA)


def error_code(resp):
    return resp.get("error", {}).get("code")


def result(resp, what):
    check("result" in resp, f"{what}: want a result, got {resp}")
    return resp["result"]


def b64(data):
    return base64.b64encode(data).decode()


def unb64(text):
    return base64.b64decode(text)


def cella_json(*args):
    out = subprocess.run([CELLA, *args], capture_output=True, timeout=60)
    check(out.returncode == 0, f"cella {' '.join(args)}: {out.stderr.decode()}")
    return json.loads(out.stdout or b"null")


# The CLI shapes matchlock's SDKs parse (no VM needed).
made = cella_json("volume", "create", "rpcvol", "--size", "16", "--json")
check(made["name"] == "rpcvol" and made["size"] == "16.0 MB" and made["path"], f"volume create {made}")
listed = [v for v in cella_json("volume", "ls", "--json") if v["name"] == "rpcvol"]
check(len(listed) == 1 and listed[0]["size"] == "16.0 MB" and listed[0]["path"] == made["path"],
      f"volume ls {listed}")
check(subprocess.run([CELLA, "volume", "rm", "rpcvol"], capture_output=True).returncode == 0,
      "volume rm")

rpc = Rpc()

# Errors before a sandbox exists: the server keeps serving through them.
check(error_code(rpc.call(1, "exec", {"command": "true"})) == -32000, "exec before create")
rpc.send_raw("{this is not json")
rpc.send_raw('{"jsonrpc":"2.0","method":"exec"' + ' ' * 100)  # truncated object
untagged = rpc.wait_untagged(2)
check(all(error_code(u) == -32700 for u in untagged), f"parse errors: {untagged}")
check(error_code(rpc.call(2, "no_such_method")) == -32601, "unknown method")
r = rpc.call(3, "port_forward", {"local_port": 1, "remote_port": 2})  # not matchlock's shape
check(error_code(r) == -32602 and "forwards" in r["error"]["message"], f"port_forward: {r}")
r = rpc.call(4, "create", {"image": IMAGE, "vfs": {"workspace": "/workspace"}})
check(error_code(r) == -32602 and "vfs" in r["error"]["message"], f"create with vfs: {r}")
r = rpc.call(5, "create", {"image": IMAGE, "resources": {"cpus": "many"}})
check(error_code(r) == -32602 and "resources.cpus" in r["error"]["message"], f"bad cpus: {r}")
check(error_code(rpc.call(6, "write_file", {"path": "/x", "content": "!!"})) in (-32602, -32000),
      "write_file before create")

# create: a normal cella sandbox.
# matchlock's vfs: a host_fs workspace, an overlay inside it and a read-only
# direct mount become host shares (all over FUSE: the sandbox starts warm),
# the memory mount inside the workspace a tmpfs shown on top of it.
import atexit
import shutil
import tempfile
share_dir = tempfile.mkdtemp(prefix="cella-rpc-share-")
atexit.register(shutil.rmtree, share_dir, True)
os.makedirs(share_dir + "/ws")
os.makedirs(share_dir + "/ro")
os.makedirs(share_dir + "/ref")
with open(share_dir + "/ref/r.txt", "w") as f:
    f.write("reference\n")
with open(share_dir + "/ws/in.txt", "w") as f:
    f.write("from host\n")
r = rpc.call(10, "create", {"image": IMAGE, "resources": {"cpus": 1, "memory_mb": 512},
                            "env": {"GREETING": "hello from rpc"},
                            "network": {"allowed_hosts": ["first.test"]},
                            "vfs": {"workspace": "/workspace",
                                    "mounts": {"/workspace": {"type": "host_fs",
                                                              "host_path": share_dir + "/ws"},
                                               "/workspace/scratch": {"type": "memory"},
                                               "/workspace/ref": {"type": "overlay",
                                                                  "lower": {"type": "host_fs",
                                                                            "host_path": share_dir + "/ref"}}},
                                    "direct_mounts": {"/mnt/ro": {"host_path": share_dir + "/ro",
                                                                  "readonly": True}}}})
sandbox_id = result(r, "create")["id"]
check(len(sandbox_id) == 32, f"sandbox id {sandbox_id}")
listed = [s.get("id") for s in cella_json("ps", "--json")]
check(sandbox_id in listed, f"cella ps does not list {sandbox_id}: {listed}")
check(error_code(rpc.call(11, "create", {"image": IMAGE})) == -32000, "second create")

r = result(rpc.call(15, "exec", {"command": "cat /workspace/in.txt; echo out > /workspace/out.txt;"
                                           " echo x > /mnt/ro/x || echo refused"}), "vfs exec")
check(unb64(r["stdout"]) == b"from host\nrefused\n", f"vfs shares {r}")
check(open(share_dir + "/ws/out.txt").read() == "out\n", "guest write not on the host")
check(os.listdir(share_dir + "/ro") == [], "a read-only direct mount was written")
# A memory mount is a tmpfs in the guest: what is written there never
# reaches the host workspace beneath it.
r = result(rpc.call(16, "exec", {"command": "echo m > /workspace/scratch/m && "
                                           "grep -c ' /workspace/scratch tmpfs ' /proc/mounts"}),
           "memory mount")
check(unb64(r["stdout"]) == b"1\n", f"memory mount {r}")
check(not os.path.exists(share_dir + "/ws/scratch/m"), "a memory mount wrote to the host")
# The overlay inside the workspace: the host tree shows, the guest's writes
# stay in the sandbox.
r = result(rpc.call(17, "exec", {"command": "cat /workspace/ref/r.txt && echo g > /workspace/ref/r.txt"
                                           " && cat /workspace/ref/r.txt && cut -d' ' -f2,3 /proc/mounts"
                                           " | grep '^/workspace' | sort"}),
           "overlay mount")
check(unb64(r["stdout"]) == b"reference\ng\n/workspace fuse\n/workspace/ref overlay\n"
      b"/workspace/scratch tmpfs\n", f"overlay mount {r}")
check(open(share_dir + "/ref/r.txt").read() == "reference\n", "an overlay mount wrote to the host")

# exec: base64 output, exit code, env, working_dir.
r = result(rpc.call(12, "exec", {"command": "echo $GREETING; echo oops >&2; exit 3"}), "exec")
check(unb64(r["stdout"]) == b"hello from rpc\n", f"stdout {r}")
check(unb64(r["stderr"]) == b"oops\n", f"stderr {r}")
check(r["exit_code"] == 3 and isinstance(r["duration_ms"], int), f"exit code {r}")
r = result(rpc.call(13, "exec", {"command": "pwd", "working_dir": "/tmp"}), "exec wd")
check(unb64(r["stdout"]) == b"/tmp\n", f"working_dir {r}")
check(error_code(rpc.call(14, "exec", {"command": 42})) == -32602, "exec with a number")

# exec_stream: output as notifications tagged with the request id.
r = result(rpc.call(20, "exec_stream",
                    {"command": "for i in 1 2 3; do echo line$i; done; echo err >&2; exit 5"}),
           "exec_stream")
check(r["exit_code"] == 5 and "stdout" not in r, f"exec_stream result {r}")
with rpc.cv:
    mine = [n for n in rpc.notifications if n["params"].get("id") == 20]
out = b"".join(unb64(n["params"]["data"]) for n in mine if n["method"] == "exec_stream.stdout")
err = b"".join(unb64(n["params"]["data"]) for n in mine if n["method"] == "exec_stream.stderr")
check(out == b"line1\nline2\nline3\n" and err == b"err\n", f"stream out={out} err={err}")

# Files: binary content, mode, parents, listing, errors.
blob = bytes(range(256)) * 40
result(rpc.call(30, "write_file", {"path": "/tmp/rpc/dir/blob.bin", "content": b64(blob),
                                   "mode": 0o600}), "write_file")
r = result(rpc.call(31, "read_file", {"path": "/tmp/rpc/dir/blob.bin"}), "read_file")
check(unb64(r["content"]) == blob, "read_file content differs")
r = result(rpc.call(32, "exec", {"command": "stat -c %a /tmp/rpc/dir/blob.bin"}), "stat")
check(unb64(r["stdout"]) == b"600\n", f"mode {r}")
r = result(rpc.call(33, "list_files", {"path": "/tmp/rpc"}), "list_files")
check([(f["name"], f["is_dir"]) for f in r["files"]] == [("dir", True)], f"list {r}")
r = result(rpc.call(34, "list_files", {"path": "/tmp/rpc/dir"}), "list_files dir")
check(r["files"][0]["name"] == "blob.bin" and r["files"][0]["size"] == len(blob), f"list {r}")
check(error_code(rpc.call(35, "read_file", {"path": "/no/such/file"})) == -32002, "missing file")
check(error_code(rpc.call(36, "write_file", {"path": "/tmp/a", "content": "%%%"})) == -32602,
      "bad base64")

# Concurrency and cancel: a slow exec does not hold up a fast one; cancel
# answers it -32003 and kills its process.
rpc.send(40, "exec", {"command": "sleep 300"})
time.sleep(1)
result(rpc.call(41, "exec", {"command": "echo fast"}), "fast exec beside a slow one")
with rpc.cv:
    check(40 not in rpc.responses, "the slow exec finished early")
r = result(rpc.call(42, "cancel", {"id": 40}), "cancel")
check(r.get("cancelled") is True, f"cancel result {r}")
check(error_code(rpc.wait(40, 30)) == -32003, f"cancelled exec: {rpc.responses[40]}")
count = None
for _ in range(20):
    r = result(rpc.call(43 + 1000 * _, "exec", {"command":
        "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' | tr -s ' ' '\\n' | grep -c '^300$' || true"}),
        "look for sleep")
    count = unb64(r["stdout"]).strip()
    if count == b"0":
        break
    time.sleep(0.5)
check(count == b"0", f"the cancelled sleep still runs ({count})")

# exec_pipe: ready first, then stdin from notifications, output streamed.
def notif(rid, method):
    with rpc.cv:
        return [n for n in rpc.notifications if n["method"] == method and n["params"].get("id") == rid]


def wait_notif(rid, method, timeout=60):
    with rpc.cv:
        if not rpc.cv.wait_for(lambda: any(n["method"] == method and n["params"].get("id") == rid
                                           for n in rpc.notifications), timeout):
            fail(f"no {method} for {rid}")


rpc.send(60, "exec_pipe", {"command": "tr a-z A-Z; echo done >&2"})
wait_notif(60, "exec_pipe.ready")
for chunk in (b"hello ", b"pipe\n"):
    rpc.send_raw(json.dumps({"jsonrpc": "2.0", "method": "exec_pipe.stdin",
                             "params": {"id": 60, "data": b64(chunk)}}))
rpc.send_raw(json.dumps({"jsonrpc": "2.0", "method": "exec_pipe.stdin_eof", "params": {"id": 60}}))
r = result(rpc.wait(60, 60), "exec_pipe")
out = b"".join(unb64(n["params"]["data"]) for n in notif(60, "exec_pipe.stdout"))
err = b"".join(unb64(n["params"]["data"]) for n in notif(60, "exec_pipe.stderr"))
check(r["exit_code"] == 0 and out == b"HELLO PIPE\n" and err == b"done\n", f"pipe {r} {out} {err}")

# exec_tty: a terminal of the asked size, resized on request.
rpc.send(61, "exec_tty", {"command": "stty size; read x; stty size", "rows": 30, "cols": 100})
wait_notif(61, "exec_tty.ready")
# Resize only once the first size was printed (bounded), so a slow guest
# cannot see the new size first.
with rpc.cv:
    if not rpc.cv.wait_for(lambda: b"30 100" in b"".join(
            unb64(n["params"]["data"]) for n in rpc.notifications
            if n["method"] == "exec_tty.stdout" and n["params"].get("id") == 61), 60):
        fail("exec_tty: the first size never came")
rpc.send_raw(json.dumps({"jsonrpc": "2.0", "method": "exec_tty.resize",
                         "params": {"id": 61, "rows": 40, "cols": 120}}))
rpc.send_raw(json.dumps({"jsonrpc": "2.0", "method": "exec_tty.stdin",
                         "params": {"id": 61, "data": b64(b"go\r")}}))
r = result(rpc.wait(61, 60), "exec_tty")
out = b"".join(unb64(n["params"]["data"]) for n in notif(61, "exec_tty.stdout"))
check(r["exit_code"] == 0 and b"30 100" in out and b"40 120" in out, f"tty {r} {out!r}")

# The egress allow-list, changed while the sandbox runs.
r = result(rpc.call(50, "allow_list_add", {"hosts": ["second.test", "first.test"]}), "allow add")
check(r["added"] == ["second.test"] and sorted(r["allowed_hosts"]) == ["first.test", "second.test"],
      f"allow_list_add {r}")
r = result(rpc.call(51, "allow_list_delete", {"hosts": ["first.test"]}), "allow delete")
check(r["removed"] == ["first.test"] and r["allowed_hosts"] == ["second.test"], f"delete {r}")
check(error_code(rpc.call(52, "allow_list_add", {"hosts": []})) == -32602, "empty hosts")

# `event` notifications: the egress proxy's decisions (a blocked and an
# allowed request to the host's registry through the gateway 10.0.2.2) and
# finished execs, in matchlock's Event shape.
registry_port = IMAGE.split("/", 1)[0].rsplit(":", 1)[1]
fetch = f"curl -s -o /dev/null -w '%{{http_code}}' -m 20 http://10.0.2.2:{registry_port}/v2/"
r = result(rpc.call(53, "exec", {"command": fetch}), "blocked fetch")
check(unb64(r["stdout"]) == b"403", f"a request to a host not allowed: {r}")
result(rpc.call(54, "allow_list_add", {"hosts": ["10.0.2.2"]}), "allow the gateway")
r = result(rpc.call(55, "exec", {"command": fetch + "; exit 7"}), "allowed fetch")
allowed_status = int(unb64(r["stdout"]) or b"0")
check(allowed_status in (200, 401), f"the registry through the gateway: {r}")
result(rpc.call(56, "allow_list_delete", {"hosts": ["10.0.2.2"]}), "disallow the gateway")


def events_where(predicate, what, timeout=30):
    deadline = time.time() + timeout
    with rpc.cv:
        while True:
            found = [n["params"] for n in rpc.notifications
                     if n.get("method") == "event" and predicate(n.get("params") or {})]
            if found:
                return found
            left = deadline - time.time()
            if left <= 0:
                events = [n["params"] for n in rpc.notifications if n.get("method") == "event"]
                fail(f"no event {what}; events: {events}")
            rpc.cv.wait(left)


def network(blocked):
    return lambda p: (p.get("type") == "network" and p["network"]["blocked"] == blocked
                      and p["network"]["url"].endswith(f":{registry_port}/v2/"))


blocked = events_where(network(True), "for the blocked request")[0]
check(blocked["network"]["method"] == "GET" and blocked["network"]["status_code"] == 403
      and blocked["network"]["block_reason"] and blocked["network"]["request_bytes"] > 0
      and isinstance(blocked["timestamp"], int) and blocked["timestamp"] > 0,
      f"blocked event {blocked}")
allowed = events_where(network(False), "for the allowed request")[0]["network"]
check(allowed["method"] == "GET" and allowed["status_code"] == allowed_status
      and allowed["url"] == f"http://10.0.2.2:{registry_port}/v2/" and allowed["host"]
      and allowed["request_bytes"] > 0 and allowed["response_bytes"] > 0
      and isinstance(allowed["duration_ms"], int) and "block_reason" not in allowed,
      f"allowed event {allowed}")
ran = events_where(lambda p: p.get("type") == "exec" and p["exec"]["command"] == fetch + "; exit 7",
                   "for the exec")[0]
check(ran["exec"]["exit_code"] == 7, f"exec event {ran}")

# port_forward (matchlock's shape): a host port reaching a guest server.
rpc.send(90, "exec_pipe", {"command": "exec python3 -c \"import socket\n"
                                      "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                                      "s.bind(('127.0.0.1', 8001)); s.listen()\n"
                                      "while True:\n"
                                      "    c, _ = s.accept(); c.sendall(b'forwarded'); c.close()\""})
r = result(rpc.call(91, "port_forward", {"forwards": [{"local_port": 0, "remote_port": 8001}]}),
           "port_forward")
binding = r["bindings"][0] if len(r.get("bindings", [])) == 1 else fail(f"bindings {r}")
check(binding["address"] == "127.0.0.1" and binding["remote_port"] == 8001
      and binding["local_port"] > 0, f"binding {binding}")
import socket
body, deadline = b"", time.time() + 60
while body != b"forwarded" and time.time() < deadline:
    try:
        with socket.create_connection(("127.0.0.1", binding["local_port"]), timeout=10) as conn:
            body = b"".join(iter(lambda: conn.recv(4096), b""))
    except OSError:
        pass
    if body != b"forwarded":
        time.sleep(0.3)  # the guest server may still be starting
check(body == b"forwarded", f"through the forward: {body!r}")
check(error_code(rpc.call(92, "port_forward", {"forwards": [{"local_port": 0, "remote_port": 0}]}))
      == -32602, "remote port 0")
check(error_code(rpc.call(93, "port_forward", {"forwards": [{"local_port": binding["local_port"],
                                                              "remote_port": 8001}]})) == -32000,
      "a host port already bound")
result(rpc.call(94, "cancel", {"id": 90}), "cancel the guest server")
# cella.port_forward_close: stops one forward; the host port refuses at once.
r = result(rpc.call(95, "cella.port_forward_close", {"local_port": binding["local_port"]}),
           "cella.port_forward_close")
check(r.get("closed") == [binding], f"closed {r}")
try:
    socket.create_connection(("127.0.0.1", binding["local_port"]), timeout=10).close()
    fail("a closed forward still accepts connections")
except ConnectionRefusedError:
    pass
check(error_code(rpc.call(96, "cella.port_forward_close", {"local_port": binding["local_port"]}))
      == -32602, "closing a forward twice")

# log: the console log so far (base64); log_stream: the same as
# log_stream.data notifications, then what is appended, until cancelled.
r = result(rpc.call(80, "log"), "log")
check(b"cella-init: agent serving" in unb64(r["content"]), f"log content {r}")
rpc.send(81, "log_stream")
with rpc.cv:
    if not rpc.cv.wait_for(lambda: b"cella-init: agent serving" in b"".join(
            unb64(n["params"]["data"]) for n in rpc.notifications
            if n["method"] == "log_stream.data" and n["params"].get("id") == 81), 30):
        fail("log_stream did not send the log so far")
wrote = result(rpc.call(82, "exec", {"command": "echo rpc-follow-marker >/dev/console"}), "console")
if wrote["exit_code"] == 0:
    with rpc.cv:
        if not rpc.cv.wait_for(lambda: b"rpc-follow-marker" in b"".join(
                unb64(n["params"]["data"]) for n in rpc.notifications
                if n["method"] == "log_stream.data" and n["params"].get("id") == 81), 30):
            fail("log_stream did not follow an appended line")
r = result(rpc.call(83, "cancel", {"id": 81}), "cancel log_stream")
check(r.get("cancelled") is True, f"cancel log_stream {r}")
check(error_code(rpc.wait(81, 30)) == -32003, f"cancelled log_stream: {rpc.responses[81]}")

# cella.attach: a second rpc process drives the same sandbox without owning
# it; its close leaves the sandbox running.
other = Rpc()
r = result(other.call(1, "cella.attach", {"id": sandbox_id}), "cella.attach")
check(r["id"] == sandbox_id, f"attach {r}")
r = result(other.call(2, "exec", {"command": "echo $GREETING"}), "exec through attach")
check(unb64(r["stdout"]) == b"hello from rpc\n", f"attached exec {r}")
check(error_code(other.call(3, "create", {"image": IMAGE})) == -32000, "create after attach")
result(other.call(4, "close", {}), "close of an attached sandbox")
other.proc.wait(30)
r = result(rpc.call(70, "exec", {"command": "echo alive"}), "exec after the attacher closed")
check(unb64(r["stdout"]) == b"alive\n", f"owner's sandbox after attach/close {r}")
check(error_code(Rpc().call(1, "cella.attach", {"id": "no-such-sandbox"})) == -32000, "attach unknown")

# The owner dies hard: the sandbox must go too.
rpc.proc.send_signal(signal.SIGKILL)
rpc.proc.wait(10)
deadline = time.time() + 60
while time.time() < deadline:
    listed = [s.get("id") for s in cella_json("ps", "-a", "--json")]
    if sandbox_id not in listed:
        break
    time.sleep(0.5)
else:
    fail(f"sandbox {sandbox_id} outlived its killed rpc process")
def leftovers():
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if sandbox_id.encode() in cmdline and (b"qemu" in cmdline or b"__supervise" in cmdline):
            found.append((pid, cmdline))
    return found


# The record goes first; the supervisor and QEMU exit right after (bounded).
deadline = time.time() + 30
while leftovers() and time.time() < deadline:
    time.sleep(0.2)
if leftovers():
    fail(f"processes of the removed sandbox still run: {leftovers()!r}")
# The reaper's removal, like close's, lets matchlock's SDK `rm ID` succeed.
rm = subprocess.run([CELLA, "rm", sandbox_id], capture_output=True, timeout=60)
check(rm.returncode == 0, f"rm of the reaped sandbox: {rm}")
rm = subprocess.run([CELLA, "rm", "0" * 32], capture_output=True, timeout=60)
check(rm.returncode == 125, f"rm of an ID that never existed: {rm}")
print("OK", flush=True)
