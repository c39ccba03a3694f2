#!/usr/bin/env python3
"""cella's Python SDK (sdk/python) against a real VM: create, exec, streaming,
files, timeouts that cancel, error codes, and close removing the sandbox.

Usage: rpc_sdk_check.py CELLA_BINARY IMAGE  (CELLA_HOME from the environment)"""

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "sdk", "python"))

import cella  # noqa: E402
from cella import RpcError, Sandbox  # noqa: E402

sys.path.insert(0, HERE)
import rpc_support  # noqa: E402
from rpc_support import check  # noqa: E402

CELLA, IMAGE = sys.argv[1], sys.argv[2]


def ps_ids():
    return rpc_support.ps_ids(CELLA)


try:
    Sandbox.create(IMAGE, cella_bin=CELLA, env={"X": "1"}, cpus=-1)
    check(False, "negative cpus accepted")
except RpcError as e:
    check(e.code == -32602 and "resources.cpus" in e.message, f"bad cpus: {e}")

seen_events = []
seen_cv = threading.Condition()


def on_event(event):
    with seen_cv:
        seen_events.append(event)
        seen_cv.notify_all()


with Sandbox.create(IMAGE, cella_bin=CELLA, env={"GREETING": "hi"}, memory_mb=512,
                    allow_hosts=["a.test"], on_event=on_event) as sb:
    check(sb.id in ps_ids(), "cella ps does not list the SDK's sandbox")
    r = sb.exec("echo $GREETING")
    check(r.ok and r.stdout_text == "hi\n", f"exec: {r}")
    r = sb.exec(["sh", "-c", "echo 'a b'; exit 7"])
    check(r.exit_code == 7 and r.stdout_text == "a b\n", f"argv exec: {r}")
    # on_event: the exec's event, and a blocked request's (a.test only).
    sb.exec("curl -s -m 20 -o /dev/null -H 'Host: b.test' http://10.0.2.2/denied")
    def both():
        return ([e for e in seen_events if e.exec and e.exec.exit_code == 7 and "a b" in e.exec.command],
                [e for e in seen_events if e.network and e.network.blocked and e.network.host == "b.test"])
    with seen_cv:
        seen_cv.wait_for(lambda: all(both()), 30)
        got_exec, got_blocked = both()
    check(got_exec and got_exec[0].type == "exec", f"on_event exec: {seen_events}")
    check(got_blocked and got_blocked[0].network.url == "http://b.test/denied"
          and got_blocked[0].network.status_code == 403, f"on_event blocked: {seen_events}")
    check(sb.events_dropped == 0, "events dropped")
    stream = sb.exec_stream("for i in 1 2 3; do echo $i; sleep 0.2; done; echo bye >&2")
    chunks = list(stream)
    out = b"".join(d for s, d in chunks if s == "stdout")
    err = b"".join(d for s, d in chunks if s == "stderr")
    check(out == b"1\n2\n3\n" and err == b"bye\n" and stream.exit_code == 0,
          f"stream: {chunks} {stream.exit_code}")
    sb.files.write("/tmp/sdk/hello.txt", "hello sdk\n")
    check(sb.files.read_text("/tmp/sdk/hello.txt") == "hello sdk\n", "files.read")
    names = [(f.name, f.size, f.mode, f.is_dir) for f in sb.files.list("/tmp/sdk")]
    check(names == [("hello.txt", 10, 0o644, False)], f"files.list: {names}")
    try:
        sb.files.read("/nope")
        check(False, "reading a missing file succeeded")
    except RpcError as e:
        check(e.code == -32002, f"missing file: {e}")
    start = time.monotonic()
    try:
        sb.exec("sleep 120", timeout=2)
        check(False, "timeout did not fire")
    except TimeoutError:
        pass
    check(time.monotonic() - start < 30, "timeout took too long")
    r = sb.exec("echo still here")
    check(r.stdout_text == "still here\n", f"after a timeout: {r}")
    p = sb.process("tr a-z A-Z")
    p.write("piped ")
    p.write(b"input\n")
    p.close_stdin()
    piped = b"".join(d for s, d in p if s == "stdout")
    check(piped == b"PIPED INPUT\n" and p.wait(30) == 0, f"process: {piped}")
    check(sorted(sb.allow_hosts.add("b.test")) == ["a.test", "b.test"], "allow_hosts.add")
    check(sb.allow_hosts.remove("a.test") == ["b.test"], "allow_hosts.remove")
    with Sandbox.attach(sb.id, cella_bin=CELLA) as other:
        check(other.exec("echo $GREETING").stdout_text == "hi\n", "attached exec")
    check(sb.exec("true").ok, "the sandbox survives its attacher's close")
    # stat/exists, a tree up and back down (modes kept, setuid dropped,
    # symlinks and empty directories recreated).
    info = sb.files.stat("/tmp/sdk/hello.txt")
    check((info.name, info.size, info.is_dir) == ("hello.txt", 10, False), f"stat: {info}")
    check(sb.files.stat("/tmp/sdk").is_dir and not sb.files.exists("/tmp/sdk/nope"), "stat dir/exists")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        os.makedirs(os.path.join(src, "sub", "deeper"))
        os.makedirs(os.path.join(src, "empty"))
        with open(os.path.join(src, "a.txt"), "w") as f:
            f.write("alpha\n")
        with open(os.path.join(src, "sub", "deeper", "b.bin"), "wb") as f:
            f.write(bytes(range(256)) * 300)
        os.chmod(os.path.join(src, "a.txt"), 0o640)
        os.symlink("a.txt", os.path.join(src, "link"))
        check(sb.upload(src, "/srv/tree") == 2, "upload count")
        r = sb.exec("cd /srv/tree && stat -c '%a' a.txt && readlink link && ls -d empty && "
                    "md5sum sub/deeper/b.bin | cut -c1-32")
        want_md5 = hashlib.md5(bytes(range(256)) * 300).hexdigest()
        check(r.ok and r.stdout_text == f"640\na.txt\nempty\n{want_md5}\n", f"uploaded tree: {r}")
        sb.exec("chmod 4755 /srv/tree/sub/deeper/b.bin && ln -s deeper/b.bin /srv/tree/sub/alias")
        back = os.path.join(tmp, "back")
        check(sb.download("/srv/tree/sub", back) == 1, "download count")
        with open(os.path.join(back, "deeper", "b.bin"), "rb") as f:
            check(f.read() == bytes(range(256)) * 300, "downloaded content")
        mode = os.stat(os.path.join(back, "deeper", "b.bin")).st_mode & 0o7777
        check(mode == 0o755, f"downloaded mode {oct(mode)} (setuid must be dropped)")
        check(os.readlink(os.path.join(back, "alias")) == "deeper/b.bin", "downloaded symlink")
        follow = sb.logs(follow=True)
        check(isinstance(next(follow), bytes), "logs(follow=True)")
        follow.close()  # cancels the stream; the connection keeps serving
        check(sb.exec("true").ok, "exec after closing a followed log")
    # The console log, and a published port reaching a guest server.
    check(isinstance(sb.logs(), bytes), "logs")
    server = sb.process(
        "exec python3 -c \"import socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('127.0.0.1', 8000)); s.listen()\n"
        "while True:\n"
        "    c, _ = s.accept(); c.sendall(b'hello from the guest'); c.close()\"")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host_port = probe.getsockname()[1]
    with sb.port_forward(host_port, 8000):
        body = b""
        deadline = time.time() + 60
        while time.time() < deadline and body != b"hello from the guest":
            try:
                with socket.create_connection(("127.0.0.1", host_port), timeout=10) as conn:
                    body = b"".join(iter(lambda: conn.recv(4096), b""))
            except OSError:
                pass
            if body != b"hello from the guest":
                time.sleep(0.3)  # the guest server may still be starting
        check(body == b"hello from the guest", f"port_forward: {body[:200]!r}")
    # Leaving the block closed the forward: the port refuses at once.
    try:
        socket.create_connection(("127.0.0.1", host_port), timeout=10).close()
        check(False, "PortForward.close() left the host port accepting")
    except ConnectionRefusedError:
        pass
    server.kill()

    async def together():
        import asyncio
        results = await asyncio.gather(*(sb.exec_async(f"sleep 1; echo {i}") for i in range(4)))
        await sb.files.write_async("/tmp/sdk/async.txt", b"async")
        return results, await sb.files.read_async("/tmp/sdk/async.txt")

    import asyncio
    start = time.monotonic()
    results, data = asyncio.run(together())
    check([r.stdout_text for r in results] == ["0\n", "1\n", "2\n", "3\n"] and data == b"async",
          f"async: {results} {data}")
    check(time.monotonic() - start < 20, "async execs did not run concurrently")
    sandbox_id = sb.id

deadline = time.time() + 60
while sandbox_id in ps_ids() and time.time() < deadline:
    time.sleep(0.5)
check(sandbox_id not in ps_ids(), "close left the sandbox behind")
# matchlock's SDKs run `rm ID` after close: that succeeds (once), quietly;
# docker's "no such sandbox" error stays for everything else.
rm = subprocess.run([CELLA, "rm", sandbox_id], capture_output=True, text=True, timeout=60)
check(rm.returncode == 0 and rm.stdout == sandbox_id + "\n" and rm.stderr == "",
      f"rm after close: {rm}")
rm = subprocess.run([CELLA, "rm", sandbox_id], capture_output=True, text=True, timeout=60)
check(rm.returncode == 125 and "no sandbox" in rm.stderr, f"second rm after close: {rm}")

# A client that goes away without close: `cella rpc` sees its stdin end and
# removes the sandbox itself.
sb = Sandbox.create(IMAGE, cella_bin=CELLA)
eof_id = sb.id
check(eof_id in ps_ids(), "second sandbox not listed")
sb._conn.shutdown(60)  # closes stdin only; waits for cella rpc to exit
check(eof_id not in ps_ids(), "stdin EOF left the sandbox behind")
# Volumes through the SDK, in the shapes matchlock's SDKs read.
vol = cella.volumes.create("sdkvol", 16, cella_bin=CELLA)
check(vol.name == "sdkvol" and vol.size == "16.0 MB" and os.path.exists(vol.path), f"volume: {vol}")
check([(v.name, v.size_bytes) for v in cella.volumes.list(cella_bin=CELLA)] == [("sdkvol", 16 << 20)],
      "volumes.list")
cella.volumes.remove("sdkvol", cella_bin=CELLA)
check("sdkvol" not in [v.name for v in cella.volumes.list(cella_bin=CELLA)], "volumes.remove")
check(any(i.reference.endswith("/test/debian:latest") or "/test/debian" in i.reference
          for i in cella.images.list(cella_bin=CELLA)), "images.list")
print("OK", flush=True)
