#!/usr/bin/env python3
"""One sandbox reused across many calls: boot once, then each call costs a
round trip (tens of ms), not a boot.

Usage: long_lived.py [IMAGE]   (default debian:bookworm)"""

import sys
import time

from cella import Sandbox

image = sys.argv[1] if len(sys.argv) > 1 else "debian:bookworm"
sb = Sandbox.create(image)
try:
    sb.files.write("/srv/counter", "0")
    for i in range(10):
        start = time.monotonic()
        r = sb.exec("n=$(cat /srv/counter); echo $((n+1)) > /srv/counter; cat /srv/counter")
        print(f"call {i}: counter={r.stdout_text.strip()} in {1000 * (time.monotonic() - start):.1f} ms")
    for stream, data in sb.exec_stream("for i in 1 2 3; do echo tick $i; sleep 1; done"):
        print(stream, data.decode(), end="")
finally:
    sb.close()
