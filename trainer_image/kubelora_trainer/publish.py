"""Publishing the adapter: files first, ``kubelora-manifest.json`` last, so "has a manifest" means "complete".

The adapter is saved into a private staging folder, its files are hashed there, then moved (local
volumes: ``os.replace`` within one filesystem) or uploaded (s3) into ``<output>/rev-<revision>/``, and
only then is the manifest written, itself through a temporary name. A reader (the operator, the adapter
agent) that finds a manifest can therefore trust every file it lists; a crash at any point leaves no
manifest, and the retried pod publishes again from scratch.

The digest algorithm lives in :mod:`kubelora.api.digest`, shared with the adapter agent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubelora.api.common import now_rfc3339
from kubelora.api.digest import EXCLUDED_DIRS, DigestMismatchError, check_files, digest_of, hash_tree
from kubelora.api.lorajob import AdapterInfo
from kubelora.api.runtime import MANIFEST_FILE, AdapterManifest, TrainerRunConfig
from kubelora.api.uris import HfURI, URIError, parse_uri
from kubelora_trainer.modelcard import CARD_FILE, render_card
from kubelora_trainer.storage import Location, locate

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
_DROP = ("training_args.bin",)
"""Files peft/transformers write next to an adapter that are not part of it (peft's README.md template is
replaced by the generated model card)."""


class ManifestError(ValueError):
    """An adapter directory whose manifest is missing, unreadable or does not match its files."""


def revision_dir(output_uri: str, revision: int) -> str:
    """URI of ``rev-<revision>/`` under the output URI."""
    return f"{output_uri.rstrip('/')}/rev-{revision}"


def verify_adapter_dir(path: str | os.PathLike[str]) -> AdapterManifest:
    """Check a local adapter directory against its manifest and return the manifest.

    Raises :class:`ManifestError` when the manifest is missing or malformed, and
    :class:`kubelora.api.digest.DigestMismatchError` (a ValueError) naming every missing, extra or changed file.
    """
    root = Path(path)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ManifestError(f"{root} has no {MANIFEST_FILE}: the adapter is incomplete (or was never published)")
    try:
        manifest = AdapterManifest.model_validate_json(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{manifest_path} is not a valid manifest: {exc}") from exc
    check_files(root, manifest.files, manifest.digest)
    total = sum((root / rel).stat().st_size for rel in manifest.files)
    if total != manifest.size_bytes:
        raise DigestMismatchError(f"{root}: files total {total} bytes but the manifest says {manifest.size_bytes}")
    return manifest


def peft_base_fields(base_model_uri: str, loaded_from: str) -> dict[str, str | None]:
    """``base_model_name_or_path`` and ``revision`` as peft means them: what ``from_pretrained`` takes.

    A Hub base is its repo id (and revision), so ``AutoPeftModelForCausalLM``, merge scripts and the Hub
    find it; any other base is the path the trainer loaded it from. The KubeLoRA URI, which servers compare
    with the base they serve, is the manifest's ``baseModel``.
    """
    try:
        parsed = parse_uri(base_model_uri)
    except URIError:
        parsed = None
    if isinstance(parsed, HfURI):
        return {"base_model_name_or_path": parsed.repo, "revision": parsed.revision}
    return {"base_model_name_or_path": loaded_from, "revision": None}


def save_adapter(model: Any, tokenizer: Any, dest: Path, base_model_uri: str, save_tokenizer: bool,
                 state_dict: dict[str, Any] | None = None, loaded_from: str | None = None) -> None:
    """Write the adapter (and the tokenizer when training changed it) into ``dest``.

    ``state_dict``: the gathered full weights of a sharded (FSDP) model; peft keeps the adapter's keys, so
    the files are the same standard peft format as a single-process run. ``loaded_from``: the path or repo
    id the base model was loaded from (peft records the model's ``name_or_path``, which an FSDP or quantized
    wrapper may not carry; this makes it explicit).
    """
    if state_dict is not None:
        model.save_pretrained(str(dest), state_dict=state_dict)
    else:
        model.save_pretrained(str(dest))
    cfg_path = dest / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    fields = peft_base_fields(base_model_uri, loaded_from or str(cfg.get("base_model_name_or_path") or ""))
    cfg["base_model_name_or_path"] = fields["base_model_name_or_path"]
    if fields["revision"]:
        cfg["revision"] = fields["revision"]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if save_tokenizer:
        tokenizer.save_pretrained(str(dest))
    for name in _DROP:
        (dest / name).unlink(missing_ok=True)


def write_card(dest: Path, run: TrainerRunConfig, metrics: dict[str, float], dataset_digest: str) -> None:
    cfg = json.loads((dest / "adapter_config.json").read_text(encoding="utf-8"))
    (dest / CARD_FILE).write_text(render_card(run, cfg, metrics, dataset_digest), encoding="utf-8")


def build_manifest(staging: Path, run: TrainerRunConfig, metrics: dict[str, float],
                   extra: Mapping[str, Any] | None = None) -> AdapterManifest:
    """``extra``: manifest fields only some adapters have (a combined adapter's inputs)."""
    files = hash_tree(staging)
    cfg = json.loads((staging / "adapter_config.json").read_text(encoding="utf-8"))
    spec = run.spec
    return AdapterManifest(
        digest=digest_of(files),
        files=files,
        size_bytes=sum((staging / rel).stat().st_size for rel in files),
        base_model=spec.base_model.uri,
        peft_type=str(cfg.get("peft_type", "LORA")),
        rank=int(cfg.get("r", spec.lora.r)),
        lora_alpha=float(cfg.get("lora_alpha", spec.lora.alpha)),
        target_modules=sorted(cfg["target_modules"]) if isinstance(cfg.get("target_modules"), list)
        else spec.lora.target_modules_value,
        method="combine" if spec.combine is not None else spec.method,
        metrics=metrics,
        created_at=now_rfc3339(),
        source=f"{run.namespace}/{run.name}@{run.revision}",
        **(extra or {}),
    )


def _clear_previous(rev: Path, keep: Path) -> None:
    """Remove a stale manifest first (it must never describe a mix of old and new files), then old files
    and staging folders left by a crashed attempt."""
    (rev / MANIFEST_FILE).unlink(missing_ok=True)
    for child in rev.iterdir():
        if child.name in EXCLUDED_DIRS or child == keep:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def _publish_local(staging: Path, rev: Path, manifest: AdapterManifest) -> None:
    _clear_previous(rev, keep=staging)
    for rel in manifest.files:
        target = rev / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staging / rel, 0o644)  # readable by the agent and engine, whatever user they run as
        os.replace(staging / rel, target)
    tmp = rev / f".{MANIFEST_FILE}.tmp"
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(manifest.model_dump_json(by_alias=True, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, rev / MANIFEST_FILE)


def _publish_remote(staging: Path, loc: Location, manifest: AdapterManifest) -> None:
    fs = loc.fs
    manifest_remote = loc.child(MANIFEST_FILE)
    if fs.exists(manifest_remote):
        fs.rm(manifest_remote)
    for rel in manifest.files:
        fs.put_file(str(staging / rel), loc.child(rel))
    manifest_local = staging / MANIFEST_FILE
    manifest_local.write_text(manifest.model_dump_json(by_alias=True, indent=2) + "\n", encoding="utf-8")
    fs.put_file(str(manifest_local), manifest_remote)


def publish_adapter(model: Any, tokenizer: Any, run: TrainerRunConfig, metrics: dict[str, float],
                    save_tokenizer: bool = False, state_dict: dict[str, Any] | None = None,
                    loaded_from: str | None = None, dataset_digest: str = "",
                    manifest_extra: Mapping[str, Any] | None = None) -> tuple[AdapterManifest, AdapterInfo]:
    """Save, hash and publish the trained adapter with its model card; return its manifest and the status
    summary."""
    rev_uri = revision_dir(run.spec.output.uri, run.revision)
    loc = locate(rev_uri)
    if loc.is_local:
        rev = Path(loc.path)
        rev.mkdir(parents=True, exist_ok=True)
        staging_parent: str | None = str(rev)  # same filesystem: os.replace is atomic
    else:
        staging_parent = None
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=staging_parent))
    try:
        save_adapter(model, tokenizer, staging, run.spec.base_model.uri, save_tokenizer, state_dict, loaded_from)
        write_card(staging, run, metrics, dataset_digest)
        manifest = build_manifest(staging, run, metrics, manifest_extra)
        if loc.is_local:
            _publish_local(staging, Path(loc.path), manifest)
        else:
            _publish_remote(staging, loc, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("published adapter %s (%s, %d bytes)", rev_uri, manifest.digest, manifest.size_bytes)
    info = AdapterInfo(uri=rev_uri, digest=manifest.digest, size_bytes=manifest.size_bytes, rank=manifest.rank,
                       base_model=manifest.base_model, peft_type=manifest.peft_type)
    return manifest, info


def existing_adapter(run: TrainerRunConfig) -> tuple[AdapterManifest, AdapterInfo] | None:
    """The adapter of this revision if it was already published and verifies (a retried, finished pod)."""
    rev_uri = revision_dir(run.spec.output.uri, run.revision)
    loc = locate(rev_uri)
    try:
        if loc.is_local:
            if not (Path(loc.path) / MANIFEST_FILE).is_file():
                return None
            manifest = verify_adapter_dir(loc.path)
        else:
            if not loc.fs.exists(loc.child(MANIFEST_FILE)):
                return None
            with tempfile.TemporaryDirectory() as tmp:
                for rel in [MANIFEST_FILE, *json.loads(loc.fs.cat_file(loc.child(MANIFEST_FILE)))["files"]]:
                    target = Path(tmp) / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    loc.fs.get_file(loc.child(rel), str(target))
                manifest = verify_adapter_dir(tmp)
    except (ValueError, OSError, KeyError) as exc:
        log.warning("found a manifest in %s but it does not verify (%s): training again", rev_uri, exc)
        return None
    info = AdapterInfo(uri=rev_uri, digest=manifest.digest, size_bytes=manifest.size_bytes, rank=manifest.rank,
                       base_model=manifest.base_model, peft_type=manifest.peft_type)
    return manifest, info
