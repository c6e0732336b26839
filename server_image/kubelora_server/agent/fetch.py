"""Copy an adapter from its URI into the local cache, verify it, and check it fits the deployment.

Two kinds of adapter folder are served:

- with a KubeLoRA manifest (what a LoRAJob publishes): only the files the manifest lists are copied, each is
  re-hashed, and a pinned digest must be the manifest's;
- without one (from the Hub, or made elsewhere by peft's ``save_pretrained``): the reader lists the folder's
  adapter files (:func:`kubelora_server.agent.stores.adapter_files`; by convention over https://), the agent
  copies them, computes the digest itself with the same algorithm, enforces a pinned digest against it, and
  records what it computed in the cache entry's manifest (``source`` says the agent wrote it).

Either way the copy is renamed into place as ``<cache>/<name>-<digest12>`` only once it verifies. So a cache
directory with that name always holds exactly the verified content (what the engine loads is what was
checked), a half-copied adapter is never loaded, and a second fetch of the same digest (agent restart, engine
restart) is answered from the cache.

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
from typing import Any

from pydantic import ValidationError

from kubelora.api.adapterdeployment import ADAPTER_NAME_PATTERN
from kubelora.api.common import now_rfc3339
from kubelora.api.digest import DigestMismatchError, check_files, digest_of, hash_tree
from kubelora.api.reasons import Reason
from kubelora.api.runtime import MANIFEST_FILE, AdapterManifest, DesiredAdapters
from kubelora.api.uris import ADAPTER_SCHEMES, S3URI, FileURI, HfURI, HttpsURI, OciURI, PvcURI, URIError, parse_uri
from kubelora_server.agent.compat import adapter_rank, check_compatible
from kubelora_server.agent.state import Problem, Ready, Want
from kubelora_server.agent.stores import (
    CONFIG_FILE,
    WEIGHT_FILES,
    AdapterSource,
    FsspecSource,
    HttpsSource,
    HubSource,
    LocalSource,
    adapter_files,
)

__all__ = ["AdapterSource", "FetchError", "FetchedAdapter", "HttpsSource", "HubSource", "LocalSource",
           "collect_garbage", "fetch_adapter", "fetch_and_check", "open_source"]
log = logging.getLogger(__name__)
AGENT_SOURCE = "kubelora-agent"
"""``source`` of a manifest the agent wrote for an adapter that came without one."""


def open_source(uri: str) -> AdapterSource:
    """The reader for ``uri``; raises :class:`FetchError` for URIs an adapter cannot come from."""
    try:
        parsed = parse_uri(uri, ADAPTER_SCHEMES)
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
    if isinstance(parsed, OciURI):
        from kubelora_server.agent.oci import OciSource

        return OciSource(parsed.registry, parsed.repository, parsed.reference)
    assert isinstance(parsed, HfURI)
    return HubSource(parsed.repo, parsed.revision)


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

    @property
    def has_own_manifest(self) -> bool:
        """False for an adapter that came without a manifest (the agent wrote the cached one)."""
        return not self.manifest.source.startswith(AGENT_SOURCE)


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
        return _fetch_plain(want, cache_dir, source, where)
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
        _copy(source, list(manifest.files), tmp, where, MANIFEST_FILE)
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


def _copy(source: AdapterSource, rels: list[str], tmp: Path, where: str, listed_in: str) -> None:
    for rel in rels:
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            source.download(rel, dest)
        except FileNotFoundError:
            raise FetchError(Problem(Reason.MANIFEST_INVALID, f"{where}/{rel} is listed in {listed_in} but does "
                                     "not exist", permanent=True)) from None
        except OSError as exc:
            raise FetchError(Problem(Reason.FETCH_FAILED, f"cannot copy {where}/{rel}: {exc}")) from None


def _agent_manifest(files: dict[str, str], size: int, config: dict[str, Any], uri: str) -> AdapterManifest:
    targets = config.get("target_modules")
    return AdapterManifest(
        digest=digest_of(files), files=files, size_bytes=size,
        base_model=str(config.get("base_model_name_or_path") or ""), peft_type=str(config.get("peft_type") or ""),
        rank=adapter_rank(config), lora_alpha=float(config.get("lora_alpha") or 0),
        target_modules=sorted(targets) if isinstance(targets, list) else str(targets or ""),
        method="lora", created_at=now_rfc3339(), source=f"{AGENT_SOURCE}: computed from {uri} (no manifest there)")


def _fetch_plain(want: Want, cache_dir: Path, source: AdapterSource, where: str) -> FetchedAdapter:
    """An adapter folder without a manifest: copy its adapter files, digest them here, enforce the pin."""
    missing = ""
    try:
        rels = adapter_files(source.list_files())
    except FileNotFoundError as exc:
        rels, missing = [], f" ({exc})"
    except OSError as exc:
        raise FetchError(Problem(Reason.FETCH_FAILED, f"cannot list {where}: {exc}")) from None
    if CONFIG_FILE not in rels or not any(w in rels for w in WEIGHT_FILES):
        raise FetchError(Problem(Reason.MANIFEST_INVALID, f"{where} holds no adapter: neither {MANIFEST_FILE} nor "
                                 f"{CONFIG_FILE} with {' or '.join(WEIGHT_FILES)}{missing}; the adapter is missing "
                                 "or not completely written", permanent=True))
    if all(w in rels for w in WEIGHT_FILES):
        rels.remove("adapter_model.bin")  # what vLLM and peft load when both exist; never two sets of weights
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{want.name}-", dir=cache_dir))
    try:
        _copy(source, rels, tmp, where, "the folder's listing")
        files = hash_tree(tmp)
        digest = digest_of(files)
        if want.pin and digest != want.pin:
            raise FetchError(Problem(Reason.DIGEST_MISMATCH, f"pinned digest {want.pin} but the files at {where} "
                                     f"({', '.join(sorted(files))}) hash to {digest}", permanent=True))
        config = _read_config(tmp)
        manifest = _agent_manifest(files, sum((tmp / rel).stat().st_size for rel in files), config, want.uri)
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(by_alias=True, indent=2) + "\n", encoding="utf-8")
        final = cache_path(cache_dir, want.name, digest)
        cached = load_cached(final, digest)
        if cached is not None:
            return cached
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s has no %s: served by the digest of its files, %s", where, MANIFEST_FILE, digest)
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
    own = fetched.manifest if fetched.has_own_manifest else None
    bad = check_compatible(fetched.config, own, desired.base_model, desired.max_lora_rank)
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
