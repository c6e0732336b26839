"""Copy an adapter from its URI into the local cache, verify it, and check it fits the deployment.

Only the files the manifest lists are copied, each is re-hashed, and the copy is renamed into place as
``<cache>/<name>-<digest12>`` only once it verifies. So a cache directory with that name always holds exactly
the verified content (what the engine loads is what was checked), a half-copied adapter is never loaded, and
a second fetch of the same digest (agent restart, engine restart) is answered from the cache.

Blocking code: the runner calls it in a worker thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import quote

from pydantic import ValidationError

from kubelora.api.adapterdeployment import ADAPTER_NAME_PATTERN
from kubelora.api.digest import DigestMismatchError, check_files, digest_of
from kubelora.api.reasons import Reason
from kubelora.api.runtime import MANIFEST_FILE, AdapterManifest, DesiredAdapters
from kubelora.api.uris import S3URI, FileURI, HfURI, HttpsURI, PvcURI, URIError, parse_uri
from kubelora_server.agent.compat import check_compatible
from kubelora_server.agent.state import Problem, Ready, Want

log = logging.getLogger(__name__)
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class SourceUnavailable(OSError):
    """The source could not be read for a reason that may go away (network, server error)."""


class AdapterSource(Protocol):
    """Read access to the files of one adapter directory. Missing files raise FileNotFoundError."""

    def read_bytes(self, rel: str) -> bytes: ...

    def download(self, rel: str, dest: Path) -> None: ...


@dataclass(frozen=True)
class LocalSource:
    """pvc:// (mounted at /mnt/pvc/<claim>) and file:// adapters."""

    root: Path

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def download(self, rel: str, dest: Path) -> None:
        shutil.copyfile(self.root / rel, dest)


@dataclass(frozen=True)
class FsspecSource:
    """s3:// adapters through s3fs (credentials from the AWS_* environment the Secret provides)."""

    fs: Any
    root: str

    def read_bytes(self, rel: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(f"{self.root}/{rel}"))
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise SourceUnavailable(f"reading {self.root}/{rel}: {exc}") from exc

    def download(self, rel: str, dest: Path) -> None:
        try:
            self.fs.get_file(f"{self.root}/{rel}", str(dest))
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise SourceUnavailable(f"downloading {self.root}/{rel}: {exc}") from exc


@dataclass(frozen=True)
class HttpsSource:
    """https:// adapters: no listing over HTTP, so each manifest file is read at ``<uri>/<file>``."""

    base_url: str
    timeout: float = 60.0

    def _url(self, rel: str) -> str:
        return self.base_url.rstrip("/") + "/" + quote(rel)

    def read_bytes(self, rel: str) -> bytes:
        import httpx

        try:
            resp = httpx.get(self._url(rel), timeout=self.timeout, follow_redirects=True)
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"GET {self._url(rel)}: {exc}") from exc
        self._check(resp.status_code, rel)
        return resp.content

    def download(self, rel: str, dest: Path) -> None:
        import httpx

        try:
            with httpx.stream("GET", self._url(rel), timeout=self.timeout, follow_redirects=True) as resp:
                self._check(resp.status_code, rel)
                with dest.open("wb") as fh:
                    for chunk in resp.iter_bytes(1 << 20):
                        fh.write(chunk)
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"GET {self._url(rel)}: {exc}") from exc

    def _check(self, status: int, rel: str) -> None:
        if status in (404, 410):
            raise FileNotFoundError(self._url(rel))
        if status >= 400:
            raise SourceUnavailable(f"GET {self._url(rel)}: HTTP {status}")


def open_source(uri: str) -> AdapterSource:
    """The reader for ``uri``; raises :class:`FetchError` for URIs an adapter cannot come from."""
    try:
        parsed = parse_uri(uri)
    except URIError as exc:
        raise FetchError(Problem(Reason.FETCH_FAILED, str(exc), permanent=True)) from None
    if isinstance(parsed, PvcURI | FileURI):
        return LocalSource(Path(parsed.local_path()))
    if isinstance(parsed, S3URI):
        import fsspec

        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
        return FsspecSource(fsspec.filesystem("s3", **kwargs), f"{parsed.bucket}/{parsed.key}".rstrip("/"))
    if isinstance(parsed, HttpsURI):
        return HttpsSource(parsed.url)
    assert isinstance(parsed, HfURI)
    raise FetchError(Problem(Reason.FETCH_FAILED, f"{uri}: hf:// is for base models; adapters come from "
                             "pvc://, s3://, https:// or file://", permanent=True))


class FetchError(Exception):
    """A fetch that did not produce a verified copy; carries the :class:`Problem` to report."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


@dataclass(frozen=True)
class FetchedAdapter:
    path: Path
    manifest: AdapterManifest
    config: dict[str, Any]


def cache_dir_name(name: str, digest: str) -> str:
    """``<name>-<first 12 hex digits>``: the digest in the path is what lets the engine's ``root`` say which
    version it has loaded."""
    return f"{name}-{digest.removeprefix('sha256:')[:12]}"


_NAME = re.compile(ADAPTER_NAME_PATTERN)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_NAME = 63


def check_name(name: str) -> None:
    """Refuse a name that could not be a cache directory's first part (the ConfigMap's model checks it too;
    this holds for every caller, tests and bench included)."""
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise FetchError(Problem(Reason.FETCH_FAILED, f"adapter name {name!r} is not a valid adapter name "
                                 f"(lowercase letters, digits, '-', '.', '_'; at most {MAX_NAME})", permanent=True))


def cache_path(cache_dir: Path, name: str, digest: str) -> Path:
    """``cache_dir/<name>-<digest12>``, proven to be a direct child of the cache root once resolved (a planted
    symlink counts as an escape), or :class:`FetchError`."""
    check_name(name)
    if not _DIGEST.fullmatch(digest):
        raise FetchError(Problem(Reason.DIGEST_MISMATCH, f"adapter {name!r}: {digest!r} is not a sha256 digest",
                                 permanent=True))
    path = cache_dir / cache_dir_name(name, digest)
    if path.resolve().parent != cache_dir.resolve():
        raise FetchError(Problem(Reason.FETCH_FAILED, f"adapter {name!r}: cache entry {path} resolves outside "
                                 f"the cache {cache_dir}", permanent=True))
    return path


def _safe_rel(rel: str) -> bool:
    p = PurePosixPath(rel)
    return (bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel and "\x00" not in rel
            and rel != MANIFEST_FILE)


def parse_manifest(raw: bytes, where: str) -> AdapterManifest:
    """Parse and sanity-check a manifest; every defect is :data:`Reason.MANIFEST_INVALID`."""
    try:
        manifest = AdapterManifest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise FetchError(Problem(Reason.MANIFEST_INVALID, f"{where}/{MANIFEST_FILE} is invalid: {loc}: "
                                 f"{first['msg']}", permanent=True)) from None
    bad = [rel for rel in manifest.files if not _safe_rel(rel)]
    if bad:
        raise FetchError(Problem(Reason.MANIFEST_INVALID, f"{where}/{MANIFEST_FILE} lists unsafe paths: "
                                 f"{', '.join(sorted(bad))}", permanent=True))
    if CONFIG_FILE not in manifest.files or not any(w in manifest.files for w in WEIGHT_FILES):
        raise FetchError(Problem(Reason.MANIFEST_INVALID, f"{where}/{MANIFEST_FILE} must list {CONFIG_FILE} "
                                 f"and one of {', '.join(WEIGHT_FILES)}", permanent=True))
    if digest_of(manifest.files) != manifest.digest:
        raise FetchError(Problem(Reason.MANIFEST_INVALID, f"{where}/{MANIFEST_FILE}: digest {manifest.digest} "
                                 f"does not match its own file list ({digest_of(manifest.files)})", True))
    return manifest


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise FetchError(Problem(Reason.MANIFEST_INVALID, f"{CONFIG_FILE} is unreadable: {exc}", True)) from None
    if not isinstance(data, dict):
        raise FetchError(Problem(Reason.MANIFEST_INVALID, f"{CONFIG_FILE} is not a JSON object", True))
    return data


def load_cached(directory: Path, digest: str | None = None) -> FetchedAdapter | None:
    """A verified cache entry, or ``None`` when it is absent or does not verify (then it is refetched)."""
    if not (directory / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = parse_manifest((directory / MANIFEST_FILE).read_bytes(), str(directory))
        if digest is not None and manifest.digest != digest:
            return None
        check_files(directory, manifest.files, manifest.digest)
        return FetchedAdapter(directory, manifest, _read_config(directory))
    except (FetchError, DigestMismatchError, OSError) as exc:
        log.warning("cached copy %s is unusable, fetching again: %s", directory, exc)
        return None


def fetch_adapter(want: Want, cache_dir: Path,
                  open_source: Callable[[str], AdapterSource] = open_source) -> FetchedAdapter:
    """Fetch ``want`` into ``cache_dir`` (or reuse a verified copy); raises :class:`FetchError`."""
    check_name(want.name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if want.pin:
        cached = load_cached(cache_path(cache_dir, want.name, want.pin), want.pin)
        if cached is not None:
            return cached
    source = open_source(want.uri)
    where = want.uri.rstrip("/")
    try:
        raw = source.read_bytes(MANIFEST_FILE)
    except FileNotFoundError:
        raise FetchError(Problem(Reason.MANIFEST_INVALID, f"{where}/{MANIFEST_FILE} does not exist: the adapter "
                                 "is missing or not completely written", permanent=True)) from None
    except OSError as exc:
        raise FetchError(Problem(Reason.FETCH_FAILED, f"cannot read {where}: {exc}")) from None
    manifest = parse_manifest(raw, where)
    if want.pin and manifest.digest != want.pin:
        raise FetchError(Problem(Reason.DIGEST_MISMATCH, f"pinned digest {want.pin} but {where} holds "
                                 f"{manifest.digest}", permanent=True))
    final = cache_path(cache_dir, want.name, manifest.digest)
    cached = load_cached(final, manifest.digest)
    if cached is not None:
        return cached
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{want.name}-", dir=cache_dir))
    try:
        (tmp / MANIFEST_FILE).write_bytes(raw)
        for rel in manifest.files:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                source.download(rel, dest)
            except FileNotFoundError:
                raise FetchError(Problem(Reason.MANIFEST_INVALID, f"{where}/{rel} is listed in {MANIFEST_FILE} "
                                         "but does not exist", permanent=True)) from None
            except OSError as exc:
                raise FetchError(Problem(Reason.FETCH_FAILED, f"cannot copy {where}/{rel}: {exc}")) from None
        try:
            check_files(tmp, manifest.files, manifest.digest)
        except DigestMismatchError as exc:
            message = str(exc).replace(str(tmp), where)
            raise FetchError(Problem(Reason.DIGEST_MISMATCH, message, permanent=True)) from None
        config = _read_config(tmp)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return FetchedAdapter(final, manifest, config)


def fetch_and_check(want: Want, desired: DesiredAdapters, cache_dir: Path,
                    open_source: Callable[[str], AdapterSource] = open_source) -> Ready | Problem:
    """The runner's fetch job: a verified copy that passed the compatibility checks, or why not."""
    try:
        fetched = fetch_adapter(want, cache_dir, open_source)
    except FetchError as exc:
        return exc.problem
    except Exception as exc:  # anything unexpected is this adapter's problem, never the agent's crash
        log.exception("fetching %s failed", want.name)
        return Problem(Reason.FETCH_FAILED, f"{type(exc).__name__}: {exc}")
    bad = check_compatible(fetched.config, fetched.manifest, desired.base_model, desired.max_lora_rank)
    if bad is not None:
        return Problem(bad.reason, bad.message, permanent=True)
    return Ready(str(fetched.path), fetched.manifest.digest)


def collect_garbage(cache_dir: Path, keep: set[str]) -> list[Path]:
    """Remove cache entries no record or engine uses (keeps in-flight ``.tmp-*`` copies)."""
    removed: list[Path] = []
    if not cache_dir.is_dir():
        return removed
    keep_resolved = {os.path.realpath(p) for p in keep}
    for entry in cache_dir.iterdir():
        if entry.name.startswith(".tmp-") or not entry.is_dir():
            continue
        if os.path.realpath(entry) not in keep_resolved:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
