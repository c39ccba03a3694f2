"""The SDK's implementation: one `cella rpc` child process per Sandbox,
newline-delimited JSON-RPC 2.0 over its stdin/stdout (the protocol is
documented in src/host/rpc/README.md of the cella repository)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import posixpath
import queue
import shlex
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

# JSON-RPC error codes cella answers with.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
VM_FAILED = -32000
EXEC_FAILED = -32001
FILE_FAILED = -32002
CANCELLED = -32003

# list_files reports Go's os.FileMode (as matchlock does).
_GO_MODE_SYMLINK = 1 << 27


class CellaError(Exception):
    """Anything that went wrong driving a sandbox."""


class RpcError(CellaError):
    """An error answer from `cella rpc`: `code` is the JSON-RPC error code
    (e.g. -32602 invalid params, -32001 exec failed, -32002 file failed)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Secret:
    """A secret the guest sees only as a placeholder; cella substitutes the
    value in requests to `hosts` (which must be allowed)."""

    name: str
    value: str
    hosts: Sequence[str]


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_ms: int

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class FileInfo:
    name: str
    size: int
    mode: int
    is_dir: bool
    is_symlink: bool = False


@dataclass(frozen=True)
class NetworkEvent:
    """One egress decision: an HTTP request answered (or refused), or a
    TLS/TCP stream allowed (when it ended) or refused."""
    method: str
    url: str
    host: str
    status_code: int
    request_bytes: int
    response_bytes: int
    duration_ms: int
    blocked: bool
    block_reason: str = ""
    protocol: str = ""


@dataclass(frozen=True)
class ExecEvent:
    """An exec of this client's that finished."""
    command: str
    exit_code: int


@dataclass(frozen=True)
class Event:
    """An `event` notification of `cella rpc` (matchlock's shape): `type` is
    "network" or "exec"; `timestamp` is Unix time in nanoseconds."""
    type: str
    timestamp: int
    network: NetworkEvent | None = None
    exec: ExecEvent | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def from_params(params: Mapping[str, Any]) -> "Event":
        net = params.get("network")
        ex = params.get("exec")
        network = None
        if isinstance(net, dict):
            network = NetworkEvent(
                method=str(net.get("method", "")), url=str(net.get("url", "")),
                host=str(net.get("host", "")), status_code=int(net.get("status_code") or 0),
                request_bytes=int(net.get("request_bytes") or 0),
                response_bytes=int(net.get("response_bytes") or 0),
                duration_ms=int(net.get("duration_ms") or 0), blocked=bool(net.get("blocked")),
                block_reason=str(net.get("block_reason", "")), protocol=str(net.get("protocol", "")))
        execution = None
        if isinstance(ex, dict):
            execution = ExecEvent(command=str(ex.get("command", "")), exit_code=int(ex.get("exit_code") or 0))
        return Event(type=str(params.get("type", "")), timestamp=int(params.get("timestamp") or 0),
                     network=network, exec=execution, raw=dict(params))


def _command_line(cmd: str | Sequence[str]) -> str:
    # The protocol takes one shell line; a list is quoted so each item stays
    # one argument.
    if isinstance(cmd, str):
        return cmd
    return shlex.join(list(cmd))


class _Pending:
    __slots__ = ("done", "result", "error", "notifications", "ready")

    def __init__(self, streaming: bool) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.notifications: queue.Queue[tuple[str, bytes] | None] | None = (
            queue.Queue() if streaming else None
        )
        self.ready: threading.Event | None = None


class _Connection:
    """One `cella rpc` process. Thread-safe: requests may be sent from many
    threads; one reader thread routes answers and notifications."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self._proc = subprocess.Popen(
            [binary, "rpc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        # `event` notifications go to the callbacks on a thread of their own,
        # through a bounded queue: a slow callback never stalls the answers
        # (when it falls this far behind, events are dropped and counted).
        self._event_handlers: list[Callable[[Event], None]] = []
        self._events: queue.Queue[Event | None] = queue.Queue(maxsize=10000)
        self.events_dropped = 0
        self._event_thread: threading.Thread | None = None
        self._reader = threading.Thread(target=self._read_loop, name="cella-rpc", daemon=True)
        self._reader.start()

    def add_event_handler(self, handler: Callable[[Event], None]) -> None:
        with self._lock:
            self._event_handlers.append(handler)
            if self._event_thread is None:
                self._event_thread = threading.Thread(target=self._event_loop, name="cella-rpc-events",
                                                      daemon=True)
                self._event_thread.start()

    def _event_loop(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            with self._lock:
                handlers = list(self._event_handlers)
            for handler in handlers:
                try:
                    handler(event)
                except Exception:  # a callback's bug must not end the delivery
                    pass

    def _deliver_event(self, params: Mapping[str, Any]) -> None:
        with self._lock:
            if not self._event_handlers:
                return
        try:
            self._events.put_nowait(Event.from_params(params))
        except queue.Full:
            self.events_dropped += 1
        except (TypeError, ValueError):
            pass  # not an event this SDK understands

    def _read_loop(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "method" in msg:
                params = msg.get("params") or {}
                if msg["method"] == "event":
                    if isinstance(params, dict):
                        self._deliver_event(params)
                    continue
                if msg["method"] == "cella.events_dropped":
                    with self._lock:
                        self.events_dropped += int(params.get("dropped") or 0)
                    continue
                with self._lock:
                    pending = self._pending.get(params.get("id"))
                if pending is not None and pending.notifications is not None:
                    stream = msg["method"].rsplit(".", 1)[-1]
                    if stream == "ready":
                        if pending.ready is not None:
                            pending.ready.set()
                    else:
                        pending.notifications.put((stream, base64.b64decode(params.get("data", ""))))
                continue
            with self._lock:
                pending = self._pending.pop(msg.get("id"), None)
            if pending is None:
                continue
            if msg.get("error"):
                err = msg["error"]
                pending.error = RpcError(int(err.get("code", INTERNAL_ERROR)), str(err.get("message")))
            else:
                pending.result = msg.get("result")
            # done before the end marker: an iterator that sees the marker
            # finds the result there.
            pending.done.set()
            if pending.notifications is not None:
                pending.notifications.put(None)
        # The process ended: fail whatever still waits.
        try:
            self._events.put_nowait(None)
        except queue.Full:
            pass
        with self._lock:
            left, self._pending = self._pending, {}
        for pending in left.values():
            pending.error = CellaError("cella rpc ended unexpectedly")
            pending.done.set()
            if pending.notifications is not None:
                pending.notifications.put(None)

    def start(self, method: str, params: Mapping[str, Any] | None, streaming: bool = False) -> tuple[int, _Pending]:
        pending = _Pending(streaming)
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            self._pending[rid] = pending
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            msg["params"] = dict(params)
        data = (json.dumps(msg) + "\n").encode()
        try:
            with self._write_lock:
                assert self._proc.stdin is not None
                self._proc.stdin.write(data)
        except (BrokenPipeError, OSError) as e:
            with self._lock:
                self._pending.pop(rid, None)
            raise CellaError(f"cella rpc is not running: {e}") from e
        return rid, pending

    def finish(self, rid: int, pending: _Pending, timeout: float | None, method: str) -> Any:
        if not pending.done.wait(timeout):
            self.cancel(rid)
            raise TimeoutError(f"{method} (id {rid}) timed out after {timeout}s; cancelled")
        if pending.error is not None:
            raise pending.error
        return pending.result

    def call(self, method: str, params: Mapping[str, Any] | None = None, timeout: float | None = None) -> Any:
        rid, pending = self.start(method, params)
        return self.finish(rid, pending, timeout, method)

    def cancel(self, rid: int) -> None:
        try:
            self.start("cancel", {"id": rid})  # fire and forget
        except CellaError:
            pass

    def shutdown(self, timeout: float) -> None:
        try:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)


class ExecStream:
    """Output of `Sandbox.exec_stream` as it arrives: iterate for
    `(stream, bytes)` pairs (`stream` is "stdout" or "stderr"); afterwards
    `exit_code` and `duration_ms` are set."""

    def __init__(self, conn: _Connection, rid: int, pending: _Pending, timeout: float | None) -> None:
        self._conn = conn
        self._rid = rid
        self._pending = pending
        self._timeout = timeout
        self.exit_code: int | None = None
        self.duration_ms: int | None = None

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        assert self._pending.notifications is not None
        while True:
            try:
                item = self._pending.notifications.get(timeout=self._timeout)
            except queue.Empty:
                self._conn.cancel(self._rid)
                raise TimeoutError(f"exec_stream (id {self._rid}): no output for {self._timeout}s; cancelled")
            if item is None:
                break
            yield item
        result = self._conn.finish(self._rid, self._pending, 0, "exec_stream")
        self.exit_code = int(result["exit_code"])
        self.duration_ms = int(result.get("duration_ms", 0))


class Process:
    """A command started with `Sandbox.process` (pipe mode): feed its stdin
    with `write`/`close_stdin`, iterate its output as `(stream, bytes)`
    pairs, `wait()` for its exit code."""

    def __init__(self, conn: _Connection, rid: int, pending: _Pending, ready: threading.Event) -> None:
        self._conn = conn
        self._rid = rid
        self._pending = pending
        self._ready = ready
        self._stream = ExecStream(conn, rid, pending, None)

    def _notify(self, method: str, params: dict[str, Any], timeout: float) -> None:
        if not self._ready.wait(timeout):
            raise TimeoutError("the process did not start in time")
        msg = {"jsonrpc": "2.0", "method": "exec_pipe." + method, "params": {"id": self._rid, **params}}
        with self._conn._write_lock:
            assert self._conn._proc.stdin is not None
            self._conn._proc.stdin.write((json.dumps(msg) + "\n").encode())

    def write(self, data: bytes | str, timeout: float = 60) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._notify("stdin", {"data": base64.b64encode(data).decode("ascii")}, timeout)

    def close_stdin(self, timeout: float = 60) -> None:
        self._notify("stdin_eof", {}, timeout)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        return iter(self._stream)

    def wait(self, timeout: float | None = None) -> int:
        """Drains the output (discarding what was not iterated) and returns
        the exit code; on `timeout` the process is killed."""
        result = self._conn.finish(self._rid, self._pending, timeout, "exec_pipe")
        return int(result["exit_code"])

    def kill(self) -> None:
        self._conn.cancel(self._rid)


@dataclass(eq=False)  # identity: a forward is a live thing, usable in sets and as a key
class PortForward:
    """A forward made by `Sandbox.port_forward` (the rpc `port_forward`
    method): host_ip:host_port on the host reaches the guest's
    127.0.0.1:guest_port until `close()` (the rpc
    `cella.port_forward_close`) or until the sandbox closes. In a `with`
    block it is closed at the end of the block."""
    host_ip: str
    host_port: int
    guest_port: int
    _conn: "_Connection | None" = field(default=None, repr=False, compare=False)
    _closed: bool = field(default=False, repr=False, compare=False)

    def close(self, timeout: float = 30) -> None:
        """Stops the forward: when it returns, the host port is free and
        open connections through it are cut. Closing twice, or after the
        sandbox closed (which ended the forward already), does nothing."""
        if self._closed or self._conn is None:
            return
        try:
            self._conn.call("cella.port_forward_close",
                            {"local_port": self.host_port, "address": self.host_ip}, timeout)
        except RpcError as e:
            if e.code != INVALID_PARAMS:  # -32602: no such forward (gone already)
                raise  # not closed: a retry may succeed
        except CellaError:
            pass  # the rpc process is gone, and the forward with it
        self._closed = True

    def __enter__(self) -> "PortForward":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AllowHosts:
    """The running sandbox's egress allow-list (`sb.allow_hosts`); the
    sandbox must have been created with `allow_hosts`."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def add(self, *hosts: str) -> list[str]:
        """Allows `hosts` for new connections; returns the list in force."""
        return list(self._conn.call("allow_list_add", {"hosts": list(hosts)}, 60)["allowed_hosts"])

    def remove(self, *hosts: str) -> list[str]:
        return list(self._conn.call("allow_list_delete", {"hosts": list(hosts)}, 60)["allowed_hosts"])


class Files:
    """File access inside a sandbox (`sb.files`)."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def write(self, path: str, data: bytes | str, mode: int = 0o644, timeout: float | None = None) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._conn.call(
            "write_file",
            {"path": path, "content": base64.b64encode(data).decode("ascii"), "mode": mode},
            timeout,
        )

    def read(self, path: str, timeout: float | None = None) -> bytes:
        result = self._conn.call("read_file", {"path": path}, timeout)
        return base64.b64decode(result["content"])

    # asyncio variants: the same calls on a worker thread, so an event loop
    # keeps running while the guest works.
    async def write_async(self, path: str, data: bytes | str, mode: int = 0o644, timeout: float | None = None) -> None:
        await asyncio.to_thread(self.write, path, data, mode, timeout)

    async def read_async(self, path: str, timeout: float | None = None) -> bytes:
        return await asyncio.to_thread(self.read, path, timeout)

    async def list_async(self, path: str, timeout: float | None = None) -> list[FileInfo]:
        return await asyncio.to_thread(self.list, path, timeout)

    def read_text(self, path: str, timeout: float | None = None) -> str:
        return self.read(path, timeout).decode("utf-8", errors="replace")

    def list(self, path: str, timeout: float | None = None) -> list[FileInfo]:
        result = self._conn.call("list_files", {"path": path}, timeout)
        return [
            FileInfo(name=f["name"], size=int(f["size"]), mode=int(f["mode"]) & 0o7777,
                     is_dir=bool(f["is_dir"]), is_symlink=bool(int(f["mode"]) & _GO_MODE_SYMLINK))
            for f in result.get("files", [])
        ]

    def stat(self, path: str, timeout: float | None = None) -> FileInfo:
        """What `list` says of `path` itself (found in its parent's listing).
        A missing path raises RpcError with FILE_FAILED, as `read` does."""
        path = posixpath.normpath(path)
        if path == "/":
            return FileInfo(name="/", size=0, mode=0o755, is_dir=True)
        parent, name = posixpath.split(path)
        for info in self.list(parent, timeout):
            if info.name == name:
                return info
        raise RpcError(FILE_FAILED, f"{path}: no such file or directory")

    def exists(self, path: str, timeout: float | None = None) -> bool:
        try:
            self.stat(path, timeout)
            return True
        except RpcError as e:
            if e.code == FILE_FAILED:
                return False
            raise


@dataclass
class _Options:
    image: str
    cpus: float | None = None
    memory_mb: int | None = None
    disk_size_mb: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    allow_hosts: Sequence[str] = ()
    secrets: Sequence[Secret] = ()
    no_network: bool = False
    hostname: str | None = None
    workdir: str | None = None
    user: str | None = None

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"image": self.image}
        resources: dict[str, Any] = {}
        if self.cpus:
            resources["cpus"] = self.cpus
        if self.memory_mb:
            resources["memory_mb"] = self.memory_mb
        if self.disk_size_mb:
            resources["disk_size_mb"] = self.disk_size_mb
        if resources:
            p["resources"] = resources
        network: dict[str, Any] = {}
        if self.allow_hosts:
            network["allowed_hosts"] = list(self.allow_hosts)
        if self.secrets:
            network["secrets"] = {s.name: {"value": s.value, "hosts": list(s.hosts)} for s in self.secrets}
        if self.no_network:
            network["no_network"] = True
        if self.hostname:
            network["hostname"] = self.hostname
        if network:
            p["network"] = network
        if self.env:
            p["env"] = dict(self.env)
        image_config: dict[str, Any] = {}
        if self.workdir:
            image_config["working_dir"] = self.workdir
        if self.user:
            image_config["user"] = self.user
        if image_config:
            p["image_config"] = image_config
        return p


class Sandbox:
    """A cella sandbox owned by this Python process: removed by `close()`,
    at the end of a `with` block, or when this process exits (the `cella
    rpc` child sees its stdin close; if it is killed, its reaper removes
    the sandbox)."""

    def __init__(self, conn: _Connection, sandbox_id: str) -> None:
        self._conn = conn
        self.id = sandbox_id
        self.files = Files(conn)
        self.allow_hosts = AllowHosts(conn)
        self._closed = False

    @classmethod
    def create(
        cls,
        image: str,
        *,
        cpus: float | None = None,
        memory_mb: int | None = None,
        disk_size_mb: int | None = None,
        env: Mapping[str, str] | None = None,
        allow_hosts: Sequence[str] = (),
        secrets: Sequence[Secret] = (),
        no_network: bool = False,
        hostname: str | None = None,
        workdir: str | None = None,
        user: str | None = None,
        on_event: Callable[[Event], None] | None = None,
        cella_bin: str | None = None,
        timeout: float | None = 600,
    ) -> "Sandbox":
        """Boots a sandbox from `image` (pulled when missing, names as
        `docker run` takes them). `cella_bin` defaults to $CELLA_BIN, then
        `cella` on PATH."""
        options = _Options(
            image=image, cpus=cpus, memory_mb=memory_mb, disk_size_mb=disk_size_mb,
            env=env or {}, allow_hosts=allow_hosts, secrets=secrets, no_network=no_network,
            hostname=hostname, workdir=workdir, user=user,
        )
        conn = _Connection(cella_bin or os.environ.get("CELLA_BIN", "cella"))
        if on_event is not None:  # before create: no event of the sandbox is missed
            conn.add_event_handler(on_event)
        try:
            result = conn.call("create", options.params(), timeout)
        except BaseException:
            conn.shutdown(30)
            raise
        return cls(conn, str(result["id"]))

    @classmethod
    def attach(cls, name_or_id: str, *, on_event: Callable[[Event], None] | None = None,
               cella_bin: str | None = None, timeout: float | None = 60) -> "Sandbox":
        """Drives an existing running sandbox (e.g. from `cella run -d`)
        without owning it: `close()` lets go and leaves it running. Its
        events reach `on_event` from the attach on."""
        conn = _Connection(cella_bin or os.environ.get("CELLA_BIN", "cella"))
        if on_event is not None:
            conn.add_event_handler(on_event)
        try:
            result = conn.call("cella.attach", {"id": name_or_id}, timeout)
        except BaseException:
            conn.shutdown(30)
            raise
        return cls(conn, str(result["id"]))

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exec(self, cmd: str | Sequence[str], *, workdir: str | None = None, timeout: float | None = None) -> ExecResult:
        """Runs `cmd` (a shell line, or an argv list quoted for you) to
        completion. On `timeout` the command is killed and TimeoutError raised."""
        params: dict[str, Any] = {"command": _command_line(cmd)}
        if workdir:
            params["working_dir"] = workdir
        r = self._conn.call("exec", params, timeout)
        return ExecResult(
            exit_code=int(r["exit_code"]),
            stdout=base64.b64decode(r.get("stdout", "")),
            stderr=base64.b64decode(r.get("stderr", "")),
            duration_ms=int(r.get("duration_ms", 0)),
        )

    async def exec_async(self, cmd: str | Sequence[str], *, workdir: str | None = None, timeout: float | None = None) -> ExecResult:
        """`exec` for asyncio: many may run at once on one sandbox."""
        return await asyncio.to_thread(lambda: self.exec(cmd, workdir=workdir, timeout=timeout))

    def exec_stream(self, cmd: str | Sequence[str], *, workdir: str | None = None, timeout: float | None = None) -> ExecStream:
        """Starts `cmd` and returns an iterator over its output as it arrives
        (`timeout`: the longest wait for the next piece)."""
        params: dict[str, Any] = {"command": _command_line(cmd)}
        if workdir:
            params["working_dir"] = workdir
        rid, pending = self._conn.start("exec_stream", params, streaming=True)
        return ExecStream(self._conn, rid, pending, timeout)

    def process(self, cmd: str | Sequence[str], *, workdir: str | None = None) -> Process:
        """Starts `cmd` with its stdin open (pipe mode) and returns at once."""
        params: dict[str, Any] = {"command": _command_line(cmd)}
        if workdir:
            params["working_dir"] = workdir
        ready = threading.Event()
        pending = _Pending(streaming=True)
        pending.ready = ready
        with self._conn._lock:
            self._conn._next_id += 1
            rid = self._conn._next_id
            self._conn._pending[rid] = pending
        msg = {"jsonrpc": "2.0", "method": "exec_pipe", "id": rid, "params": params}
        with self._conn._write_lock:
            assert self._conn._proc.stdin is not None
            self._conn._proc.stdin.write((json.dumps(msg) + "\n").encode())
        return Process(self._conn, rid, pending, ready)

    def upload(self, local_path: str, remote_path: str, timeout: float | None = None) -> int:
        """Copies a host file or directory tree into the guest at
        `remote_path` (created, parents too), keeping permission bits (not
        setuid/setgid). Symlinks are recreated as symlinks. Returns the
        number of files written."""
        if os.path.isfile(local_path):  # a top-level link is followed, as `cp` does
            self._upload_file(local_path, remote_path, timeout)
            return 1
        if not os.path.isdir(local_path):
            raise CellaError(f"upload: {local_path}: not a file or directory")
        written = 0
        empty_dirs: list[str] = []
        links: list[tuple[str, str]] = []
        def unreadable(error: OSError) -> None:
            raise CellaError(f"upload: {error}")

        for root, dirs, files in os.walk(local_path, onerror=unreadable):
            rel = os.path.relpath(root, local_path)
            target = remote_path if rel == "." else posixpath.join(remote_path, *rel.split(os.sep))
            for name in list(dirs):
                if os.path.islink(os.path.join(root, name)):
                    dirs.remove(name)  # a link to a directory: recreated, not followed
                    files.append(name)
            if not dirs and not files:
                empty_dirs.append(target)
            for name in files:
                src = os.path.join(root, name)
                if os.path.islink(src):
                    links.append((os.readlink(src), posixpath.join(target, name)))
                elif os.path.isfile(src):
                    self._upload_file(src, posixpath.join(target, name), timeout)
                    written += 1
        for d in empty_dirs:
            self._must(self.exec(["mkdir", "-p", "--", d], timeout=timeout), "mkdir " + d)
        for link_target, at in links:
            self._must(self.exec(["mkdir", "-p", "--", posixpath.dirname(at)], timeout=timeout),
                       "mkdir " + posixpath.dirname(at))
            self._must(self.exec(["ln", "-sfn", "--", link_target, at], timeout=timeout), "symlink " + at)
        return written

    def download(self, remote_path: str, local_path: str, timeout: float | None = None) -> int:
        """Copies a guest file or directory tree to `local_path` on the host.
        Files land as the calling user with permission bits kept but never
        setuid/setgid (as `cella cp` does). Returns the number of files."""
        info = self.files.stat(remote_path, timeout)
        if not info.is_dir:
            self._download_file(remote_path, info, local_path, timeout)
            return 1
        written = 0
        pending = [(remote_path, local_path)]
        while pending:
            remote_dir, local_dir = pending.pop()
            if not os.path.isdir(local_dir):
                os.makedirs(local_dir, mode=0o755)  # existing directories keep their modes
            for entry in self.files.list(remote_dir, timeout):
                if entry.name in (".", "..") or "/" in entry.name or "\0" in entry.name:
                    continue  # the guest names its entries; only plain names are taken
                remote = posixpath.join(remote_dir, entry.name)
                local = os.path.join(local_dir, entry.name)
                if entry.is_symlink:
                    # Recreated as a link (as `cella cp` does), never followed.
                    target = self.exec(["readlink", "--", remote], timeout=timeout)
                    self._must(target, "readlink " + remote)
                    if os.path.lexists(local):
                        os.unlink(local)
                    os.symlink(target.stdout_text.rstrip("\n"), local)
                elif entry.is_dir:
                    pending.append((remote, local))
                else:
                    self._download_file(remote, entry, local, timeout)
                    written += 1
        return written

    def logs(self, *, follow: bool = False, timeout: float | None = None) -> bytes | Iterator[bytes]:
        """The sandbox's console log: all of it (`follow=False`), or an
        iterator that yields new output as it is written until the sandbox
        ends or the iterator is closed (`follow=True`)."""
        if not follow:
            return base64.b64decode(self._conn.call("log", {}, timeout).get("content", ""))
        rid, pending = self._conn.start("log_stream", {}, streaming=True)
        return self._follow(rid, pending)

    def _follow(self, rid: int, pending: _Pending) -> Iterator[bytes]:
        assert pending.notifications is not None
        try:
            while True:
                item = pending.notifications.get()
                if item is None:
                    return
                yield item[1]
        finally:
            if not pending.done.is_set():
                self._conn.cancel(rid)  # the caller stopped reading: end the stream

    def port_forward(self, host_port: int, guest_port: int, *, host_ip: str = "127.0.0.1",
                     timeout: float = 30) -> "PortForward":
        """Forwards host_ip:host_port (0: a free port, see `.host_port`) to
        the guest's 127.0.0.1:guest_port until the forward's `close()` or
        the sandbox's; listening when the call returns."""
        result = self._conn.call("port_forward", {
            "forwards": [{"local_port": host_port, "remote_port": guest_port}],
            "addresses": [host_ip]}, timeout)
        binding = result["bindings"][0]
        return PortForward(str(binding["address"]), int(binding["local_port"]), int(binding["remote_port"]),
                           _conn=self._conn)

    def on_event(self, handler: Callable[[Event], None]) -> None:
        """Calls `handler(Event)` for each `event` notification from now on:
        egress decisions (`event.network`) and finished execs (`event.exec`).
        Handlers run on one thread of their own, in order; events that find
        10000 undelivered ones waiting are dropped (`sb.events_dropped`)."""
        self._conn.add_event_handler(handler)

    @property
    def events_dropped(self) -> int:
        """Events lost: by this SDK (handlers too slow) or by cella (the
        sandbox's bounded event ring overflowed before they were read)."""
        return self._conn.events_dropped

    def _upload_file(self, src: str, dest: str, timeout: float | None) -> None:
        with open(src, "rb") as f:
            data = f.read()
        self.files.write(dest, data, os.stat(src).st_mode & 0o777, timeout)

    def _download_file(self, remote: str, info: FileInfo, local: str, timeout: float | None) -> None:
        data = self.files.read(remote, timeout)
        fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(local, info.mode & 0o777)

    @staticmethod
    def _must(result: ExecResult, what: str) -> None:
        if not result.ok:
            raise CellaError(f"{what}: {result.stderr_text.strip() or 'exit ' + str(result.exit_code)}")

    def close(self, timeout: float = 10) -> None:
        """Stops and removes the sandbox (guest processes get a short grace)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.call("close", {"timeout_seconds": 2}, timeout + 30)
        except (CellaError, TimeoutError):
            pass  # the rpc process removes the sandbox when its stdin ends
        finally:
            self._conn.shutdown(timeout + 30)
