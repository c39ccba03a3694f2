"""What the `cella rpc` checks share (rpc_check.py, rpc_many_check.py,
rpc_sdk_check.py): failing with a message, a raw `cella rpc` process whose
answers a reader thread collects, and the sandbox IDs `cella ps` lists."""

import json
import subprocess
import sys
import threading

TIMEOUT = 300


def fail(message):
    print("FAIL: " + message, flush=True)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def ps_ids(cella):
    """The IDs of every sandbox, running or not."""
    out = subprocess.run([cella, "ps", "-a", "--json"], capture_output=True, timeout=60)
    check(out.returncode == 0, f"ps: {out.stderr!r}")
    return {s["id"] for s in json.loads(out.stdout or b"[]")}


class Rpc:
    """One `cella rpc` process speaking newline-delimited JSON-RPC, as
    matchlock's SDKs do. A reader thread files answers by ID, id-less errors
    and notifications apart."""

    def __init__(self, cella):
        self.proc = subprocess.Popen([cella, "rpc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=sys.stderr, bufsize=0)
        self.cv = threading.Condition()
        self.responses = {}
        self.untagged = []  # responses with a null id
        self.notifications = []
        self.order = []  # ids in answer order
        self.next_id = 1 << 20  # request()'s own ids, apart from the callers' own
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cv:
                if "method" in msg:
                    self.notifications.append(msg)
                elif msg.get("id") is None:
                    self.untagged.append(msg)
                else:
                    self.responses[msg["id"]] = msg
                    self.order.append(msg["id"])
                self.cv.notify_all()

    def send_raw(self, text):
        self.proc.stdin.write(text.encode() + b"\n")

    def send(self, rid, method, params=None):
        msg = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            msg["params"] = params
        self.send_raw(json.dumps(msg))

    def wait(self, rid, timeout=TIMEOUT):
        with self.cv:
            if not self.cv.wait_for(lambda: rid in self.responses, timeout):
                fail(f"no answer to request {rid} within {timeout}s")
            return self.responses[rid]

    def call(self, rid, method, params=None, timeout=TIMEOUT):
        self.send(rid, method, params)
        return self.wait(rid, timeout)

    def request(self, method, params, timeout=TIMEOUT):
        """A call with an ID of its own: the result, or RuntimeError."""
        with self.cv:
            self.next_id += 1
            rid = self.next_id
        answer = self.call(rid, method, params, timeout)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def wait_untagged(self, count, timeout=30):
        with self.cv:
            if not self.cv.wait_for(lambda: len(self.untagged) >= count, timeout):
                fail(f"expected {count} id-less errors, got {self.untagged}")
            return list(self.untagged)
