"""Adapter digests: one algorithm shared by the trainer (which writes them) and the agent (which checks them).

The digest of an adapter directory is the sha256 of its ``sha256sum``-style listing::

    <sha256 hex of file>  <relative posix path>\\n      (one line per file, sorted by path, byte order)

over every file except ``kubelora-manifest.json`` itself, the ``checkpoints/`` tree (training state
that lives beside the adapter but is not part of it) and ``merged/`` (the merged model, which has its own
manifest, whose digest is computed the same way). Using the ``sha256sum`` format means anyone can
re-check a published adapter with coreutils alone::

    cd rev-1 && find . -type f ! -name kubelora-manifest.json ! -path './checkpoints/*' ! -path './merged/*' \\
      -printf '%P\\n' \\
      | LC_ALL=C sort | xargs sha256sum | sha256sum

This module uses only the standard library so that every component (and a shell) can reproduce it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

DIGEST_PREFIX = "sha256:"
MANIFEST_NAME = "kubelora-manifest.json"
"""Same value as ``kubelora.api.runtime.MANIFEST_FILE`` (kept here so this module needs no pydantic)."""
EXCLUDED_DIRS = ("checkpoints", "merged")
"""Top-level folders of an output revision that are not part of the adapter."""
_CHUNK = 1 << 20


class DigestMismatchError(ValueError):
    """Files on disk do not match what the manifest promises; the message lists every difference."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of one file, streamed so multi-GB files do not need to fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_of(files: Mapping[str, str]) -> str:
    """``sha256:<hex>`` over the sorted (path, sha256) pairs, in ``sha256sum`` listing format."""
    h = hashlib.sha256()
    for rel in sorted(files, key=lambda p: p.encode()):
        h.update(f"{files[rel]}  {rel}\n".encode())
    return DIGEST_PREFIX + h.hexdigest()


def adapter_files(root: str | os.PathLike[str], excluded_dirs: Iterable[str] = EXCLUDED_DIRS) -> list[str]:
    """Relative posix paths of the files that make up the adapter in ``root`` (manifest excluded)."""
    base = Path(root)
    skip = set(excluded_dirs)
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = Path(dirpath).relative_to(base)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out, key=lambda p: p.encode())


def hash_tree(root: str | os.PathLike[str], excluded_dirs: Iterable[str] = EXCLUDED_DIRS) -> dict[str, str]:
    """Relative path -> sha256 hex for every adapter file under ``root``."""
    return {rel: file_sha256(Path(root) / rel) for rel in adapter_files(root, excluded_dirs)}


def check_files(root: str | os.PathLike[str], expected: Mapping[str, str], expected_digest: str,
                excluded_dirs: Iterable[str] = EXCLUDED_DIRS) -> dict[str, str]:
    """Re-hash ``root`` and compare with a manifest's ``files`` and ``digest``.

    Raises :class:`DigestMismatchError` naming every missing, extra or changed file (an extra file matters:
    a stray ``adapter_model.bin`` would be loaded instead of the verified safetensors). Returns the hashes.
    """
    problems: list[str] = []
    if digest_of(expected) != expected_digest:
        problems.append(f"manifest digest {expected_digest} does not match its own file list "
                        f"({digest_of(expected)})")
    actual = hash_tree(root, excluded_dirs)
    for rel in sorted(set(expected) - set(actual)):
        problems.append(f"{rel}: listed in the manifest but missing")
    for rel in sorted(set(actual) - set(expected)):
        problems.append(f"{rel}: present but not listed in the manifest")
    for rel in sorted(set(expected) & set(actual)):
        if expected[rel] != actual[rel]:
            problems.append(f"{rel}: sha256 {actual[rel]} but the manifest says {expected[rel]}")
    if problems:
        raise DigestMismatchError(f"adapter at {os.fspath(root)} does not match {MANIFEST_NAME}: "
                                  + "; ".join(problems))
    return actual
