"""cella's Python SDK: drive microVM sandboxes from code through `cella rpc`.

    from cella import Sandbox

    with Sandbox.create("debian:bookworm") as sb:
        print(sb.exec("echo hello").stdout_text)

Only the standard library is used. See README.md.
"""

from ._client import (
    AllowHosts,
    CellaError,
    ExecResult,
    ExecStream,
    FileInfo,
    Files,
    Process,
    RpcError,
    Sandbox,
    Secret,
)

__all__ = [
    "AllowHosts",
    "CellaError",
    "ExecResult",
    "ExecStream",
    "FileInfo",
    "Files",
    "Process",
    "RpcError",
    "Sandbox",
    "Secret",
]
