#!/usr/bin/env python3
"""Egress allow-list with a secret: the guest may reach only the allowed
host, and sees a placeholder instead of the API key; cella puts the real key
into requests to that host only.

Usage: API_KEY=... egress_secret.py [IMAGE] [HOST]   (image needs curl)"""

import os
import sys

from cella import Sandbox, Secret

image = sys.argv[1] if len(sys.argv) > 1 else "debian:bookworm"
host = sys.argv[2] if len(sys.argv) > 2 else "api.example.com"
key = os.environ.get("API_KEY", "sk-test")

with Sandbox.create(image, allow_hosts=[host], secrets=[Secret("API_KEY", key, [host])]) as sb:
    print("the guest sees:", sb.exec("echo $API_KEY").stdout_text.strip())
    r = sb.exec(f'curl -sS -o /dev/null -w "%{{http_code}}\\n" -H "Authorization: Bearer $API_KEY" https://{host}/', timeout=60)
    print("allowed host:", r.stdout_text.strip() or r.stderr_text.strip())
    r = sb.exec("curl -sS -m 5 https://example.org/ || true", timeout=60)
    print("other host:", (r.stdout_text + r.stderr_text).strip()[:120])
    sb.allow_hosts.add("example.org")
    print("after allow_hosts.add:", sb.exec("curl -sS -o /dev/null -w '%{http_code}' https://example.org/").stdout_text)
