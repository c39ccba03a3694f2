#!/usr/bin/env python3
"""Run untrusted code in a throw-away microVM and collect its output.

Usage: run_untrusted.py [IMAGE]   (default python:3.12-slim; needs python3)"""

import sys

from cella import Sandbox

UNTRUSTED = """
import os, socket
print("uid", os.getuid(), "host", socket.gethostname())
open("/tmp/result.txt", "w").write("computed: %d\\n" % sum(range(10**6)))
"""

image = sys.argv[1] if len(sys.argv) > 1 else "python:3.12-slim"
# no_network: the code cannot reach anything; the VM is removed at the end.
with Sandbox.create(image, no_network=True, memory_mb=512) as sb:
    sb.files.write("/tmp/job.py", UNTRUSTED)
    r = sb.exec(["python3", "/tmp/job.py"], timeout=120)
    print("exit", r.exit_code)
    print(r.stdout_text, end="")
    print(r.stderr_text, end="", file=sys.stderr)
    print(sb.files.read_text("/tmp/result.txt"), end="")
