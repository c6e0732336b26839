"""URIs -> filesystems: the one place that knows how pvc://, file://, s3:// and https:// are read and written.

``pvc://`` and ``file://`` become local paths (the operator mounts claims at ``/mnt/pvc/<claim>``), ``s3://``
goes through s3fs with the ``AWS_*`` variables the operator injects from the referenced Secret, and
``https://`` is read-only through fsspec's HTTP filesystem. Everything else in the trainer works on local
paths or on the ``(filesystem, path)`` pairs returned here, so adding a scheme is a change to this file only.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubelora.api.uris import S3URI, ArtifactURI, FileURI, HttpsURI, PvcURI, parse_uri

log = logging.getLogger(__name__)


def s3_options() -> dict[str, Any]:
    """s3fs options from the environment (the Secret's keys arrive as env vars via ``secretKeyRef``)."""
    opts: dict[str, Any] = {}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    client_kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


@dataclass(frozen=True)
class Location:
    """A parsed URI plus the fsspec filesystem and path that reach it."""

    uri: ArtifactURI
    fs: Any
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.uri, PvcURI | FileURI)

    def display(self, rel: str = "") -> str:
        """The URI (optionally with a relative file) as users wrote it: what error messages show."""
        text = str(self.uri)
        return f"{text.rstrip('/')}/{rel}" if rel else text

    def child(self, rel: str) -> str:
        """fsspec path of ``rel`` below this location."""
        return posixpath.join(self.path, rel) if rel else self.path


def locate(uri: str | ArtifactURI) -> Location:
    """Parse ``uri`` and open the filesystem for it (no network I/O happens here for s3/https)."""
    import fsspec

    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if isinstance(parsed, PvcURI | FileURI):
        return Location(parsed, fsspec.filesystem("file"), parsed.local_path())
    if isinstance(parsed, S3URI):
        fs = fsspec.filesystem("s3", **s3_options())
        fs.invalidate_cache()  # fsspec reuses instances: never trust a listing cached by an earlier step
        return Location(parsed, fs, f"{parsed.bucket}/{parsed.key}".rstrip("/"))
    if isinstance(parsed, HttpsURI):
        return Location(parsed, fsspec.filesystem("https"), parsed.url)
    raise ValueError(f"{parsed}: {parsed.scheme}:// cannot be read as files here")


def download_dir(loc: Location, dest: Path, include: tuple[str, ...] | None = None) -> Path:
    """Copy the files of a remote directory (s3) into ``dest``; ``include`` limits it to those names."""
    dest.mkdir(parents=True, exist_ok=True)
    for remote in loc.fs.find(loc.path):
        rel = posixpath.relpath(remote, loc.path)
        if include is not None and rel not in include:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        loc.fs.get(remote, str(target))
    return dest


def upload_dir(src: Path, loc: Location, rel: str, last: tuple[str, ...] = ()) -> None:
    """Upload ``src`` to ``rel`` below ``loc``; files named in ``last`` go after all others.

    Uploading the file that marks completeness last (a manifest, a trainer_state.json) means a reader never
    sees a complete-looking copy whose other files are still in flight.
    """
    files = sorted(p for p in src.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)
    for path in files:
        loc.fs.put_file(str(path), loc.child(posixpath.join(rel, path.relative_to(src).as_posix())))
