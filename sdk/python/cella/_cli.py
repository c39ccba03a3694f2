"""Images and volumes: the store-wide calls that need no sandbox. They run
the `cella` command (its `--json` output), so they work wherever the CLI does."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from ._client import CellaError


def _binary(cella_bin: str | None) -> str:
    return cella_bin or os.environ.get("CELLA_BIN", "cella")


def _run(cella_bin: str | None, *args: str, timeout: float | None = 600) -> str:
    try:
        done = subprocess.run([_binary(cella_bin), *args], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"cella {' '.join(args)}: no answer within {timeout} s") from e
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip() or f"exit {done.returncode}"
        raise CellaError(f"cella {' '.join(args)}: {message}")
    return done.stdout.decode()


@dataclass
class Image:
    reference: str
    digest: str
    size: int
    platform: str


@dataclass
class Volume:
    name: str
    size: str  # as matchlock prints it, e.g. "16.0 MB"
    path: str
    size_bytes: int | None = None  # `volume ls` gives it


class images:  # noqa: N801 (a namespace: cella.images.pull(...))
    @staticmethod
    def pull(reference: str, *, cella_bin: str | None = None, timeout: float | None = 1800) -> None:
        """Pulls `reference` (names as `docker pull` takes them) into the store."""
        _run(cella_bin, "pull", reference, timeout=timeout)

    @staticmethod
    def list(*, cella_bin: str | None = None) -> list[Image]:
        rows: list[dict[str, Any]] = json.loads(_run(cella_bin, "images", "--json") or "[]")
        return [Image(reference=r["reference"], digest=r.get("digest", ""), size=int(r.get("size", 0)),
                      platform=r.get("platform", "")) for r in rows]

    @staticmethod
    def remove(reference: str, *, cella_bin: str | None = None) -> None:
        _run(cella_bin, "rmi", reference)


class volumes:  # noqa: N801 (a namespace: cella.volumes.create(...))
    @staticmethod
    def create(name: str, size_mb: int, *, cella_bin: str | None = None) -> Volume:
        r = json.loads(_run(cella_bin, "volume", "create", name, "--size", str(size_mb), "--json"))
        return Volume(name=r["name"], size=str(r["size"]), path=r["path"])

    @staticmethod
    def list(*, cella_bin: str | None = None) -> list[Volume]:
        rows = json.loads(_run(cella_bin, "volume", "ls", "--json") or "[]")
        return [Volume(name=r["name"], size=str(r["size"]), path=r["path"],
                       size_bytes=r.get("size_bytes")) for r in rows]

    @staticmethod
    def remove(name: str, *, cella_bin: str | None = None) -> None:
        _run(cella_bin, "volume", "rm", name)
