"""cella's Python SDK: drive microVM sandboxes from code through `cella rpc`.

    from cella import Sandbox

    with Sandbox.create("debian:bookworm") as sb:
        print(sb.exec("echo hello").stdout_text)

Only the standard library is used. See README.md.
"""

from . import _cli
from ._cli import Image, Volume
from ._client import (
    AllowHosts,
    CellaError,
    Event,
    ExecEvent,
    ExecResult,
    ExecStream,
    FileInfo,
    Files,
    NetworkEvent,
    PortForward,
    Process,
    RpcError,
    Sandbox,
    Secret,
)

images = _cli.images
volumes = _cli.volumes

__all__ = [
    "Image",
    "PortForward",
    "Volume",
    "images",
    "volumes",
    "AllowHosts",
    "CellaError",
    "Event",
    "ExecEvent",
    "ExecResult",
    "ExecStream",
    "FileInfo",
    "Files",
    "NetworkEvent",
    "Process",
    "RpcError",
    "Sandbox",
    "Secret",
]
