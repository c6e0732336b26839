"""The merged model (``spec.output.merged``): base + adapter folded into one plain model, published with a digest.

Runs after the adapter is published, from the published (verified) adapter files, never from the training
model in memory: that model may be 4-bit (qlora) or sharded (FSDP), and merging into 4-bit weights rounds
the update away. The base is loaded again, on the CPU, in ``merged.dtype``; peft's ``merge_and_unload``
folds ``W + (alpha/r) B A`` into each wrapped layer; the result is saved as sharded safetensors with the
tokenizer into ``rev-<revision>/merged/``, files first and ``kubelora-manifest.json`` last, like the adapter.

A retried pod that finds a merged model whose manifest verifies and names the same adapter digest reuses it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubelora.api.common import now_rfc3339
from kubelora.api.digest import check_files, digest_of, hash_tree
from kubelora.api.lorajob import AdapterInfo
from kubelora.api.merged import MERGED_DIR, MergedModelInfo, MergedModelManifest
from kubelora.api.runtime import MANIFEST_FILE, TrainerRunConfig
from kubelora_trainer.errors import TrainingFailedError
from kubelora_trainer.modelload import ModelRef, load_tokenizer, resolve_base_model
from kubelora_trainer.publish import ManifestError, revision_dir, verify_adapter_dir
from kubelora_trainer.storage import Location, download_dir, locate

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"


def merged_uri(run: TrainerRunConfig) -> str:
    return f"{revision_dir(run.spec.output.uri, run.revision)}/{MERGED_DIR}"


def verify_merged_dir(path: str | os.PathLike[str]) -> MergedModelManifest:
    """Check a local merged-model folder against its manifest (raises ManifestError or DigestMismatchError)."""
    root = Path(path)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ManifestError(f"{root} has no {MANIFEST_FILE}: the merged model is incomplete")
    try:
        manifest = MergedModelManifest.model_validate_json(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{manifest_path} is not a merged-model manifest: {exc}") from exc
    check_files(root, manifest.files, manifest.digest, excluded_dirs=())
    return manifest


def merge_into_base(adapter_dir: Path, ref: ModelRef, dtype: str) -> Any:
    """The base loaded in ``dtype`` on the CPU with the adapter merged in: a plain transformers model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    # Never the 4-bit base of a qlora run: the merge needs the full-precision weights.
    base = AutoModelForCausalLM.from_pretrained(ref.name_or_path, dtype=torch_dtype, device_map="cpu",
                                                **ref.pretrained_kwargs())
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # a model for serving; training switched it off
    return merged


def _local_adapter(run: TrainerRunConfig, work: Path) -> Path:
    """A verified local copy of the published adapter (the revision folder itself on pvc/file)."""
    loc = locate(revision_dir(run.spec.output.uri, run.revision))
    if loc.is_local:
        return Path(loc.path)
    dest = work / "adapter"
    listed = json.loads(loc.fs.cat_file(loc.child(MANIFEST_FILE)))["files"]
    download_dir(loc, dest, include=(MANIFEST_FILE, *listed))  # not the checkpoints beside it
    verify_adapter_dir(dest)
    return dest


def _publish(staging: Path, loc: Location, manifest: MergedModelManifest) -> None:
    """Files first, the manifest last (through a temporary name on local volumes)."""
    text = manifest.model_dump_json(by_alias=True, indent=2) + "\n"
    if not loc.is_local:
        fs = loc.fs
        if fs.exists(loc.child(MANIFEST_FILE)):
            fs.rm(loc.child(MANIFEST_FILE))
        for rel in manifest.files:
            fs.put_file(str(staging / rel), loc.child(rel))
        (staging / MANIFEST_FILE).write_text(text, encoding="utf-8")
        fs.put_file(str(staging / MANIFEST_FILE), loc.child(MANIFEST_FILE))
        return
    root = Path(loc.path)
    (root / MANIFEST_FILE).unlink(missing_ok=True)
    for child in root.iterdir():
        if child != staging:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    for rel in manifest.files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staging / rel, 0o644)
        os.replace(staging / rel, root / rel)
    tmp = root / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, root / MANIFEST_FILE)


def _info(uri: str, manifest: MergedModelManifest) -> MergedModelInfo:
    return MergedModelInfo(uri=uri, digest=manifest.digest, size_bytes=manifest.size_bytes,
                           base_model=manifest.base_model, adapter_digest=manifest.adapter_digest,
                           dtype=manifest.dtype)


def existing_merged(run: TrainerRunConfig, adapter_digest: str) -> MergedModelInfo | None:
    """The merged model of this revision if it verifies and was merged from this adapter."""
    uri = merged_uri(run)
    loc = locate(uri)
    try:
        if loc.is_local:
            if not (Path(loc.path) / MANIFEST_FILE).is_file():
                return None
            manifest = verify_merged_dir(loc.path)
        else:
            if not loc.fs.exists(loc.child(MANIFEST_FILE)):
                return None
            with tempfile.TemporaryDirectory() as tmp:
                manifest = verify_merged_dir(download_dir(loc, Path(tmp)))
    except (ValueError, OSError) as exc:
        log.warning("found a merged model at %s but it does not verify (%s): merging again", uri, exc)
        return None
    return _info(uri, manifest) if manifest.adapter_digest == adapter_digest else None


def publish_merged(run: TrainerRunConfig, adapter: AdapterInfo) -> MergedModelInfo:
    """Merge the published adapter into a fresh full-precision base and publish it under ``merged/``."""
    spec = run.spec
    wanted = spec.output.merged
    assert wanted is not None
    uri = merged_uri(run)
    loc = locate(uri)
    with tempfile.TemporaryDirectory(prefix="kubelora-merge-") as work:
        adapter_dir = _local_adapter(run, Path(work))
        ref = resolve_base_model(spec.base_model.uri, tokenizer_only=False)
        # The adapter carries a tokenizer only when training changed it (added tokens): then that one.
        has_own_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(ModelRef(adapter.uri, str(adapter_dir)) if has_own_tokenizer else ref)
        tokenizer.padding_side = "left"  # for generation; load_tokenizer sets right padding for training
        try:
            merged = merge_into_base(adapter_dir, ref, wanted.dtype)
        except Exception as exc:
            raise TrainingFailedError(f"merging the adapter into {spec.base_model.uri} failed: "
                                      f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        if loc.is_local:
            Path(loc.path).mkdir(parents=True, exist_ok=True)
        # On a local volume the staging folder sits inside merged/ (same filesystem: os.replace is atomic;
        # and merged/ is outside the adapter's digest, so a reader verifying the adapter meanwhile is unharmed).
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=loc.path if loc.is_local else work))
        try:
            merged.save_pretrained(str(staging), max_shard_size=wanted.max_shard_size)
            tokenizer.save_pretrained(str(staging))
            del merged
            files = hash_tree(staging, excluded_dirs=())
            manifest = MergedModelManifest(
                digest=digest_of(files), files=files,
                size_bytes=sum((staging / rel).stat().st_size for rel in files),
                base_model=spec.base_model.uri, adapter_digest=adapter.digest, dtype=wanted.dtype,
                created_at=now_rfc3339(), source=f"{run.namespace}/{run.name}@{run.revision}")
            _publish(staging, loc, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("published merged model %s (%s, %d bytes, %s)", uri, manifest.digest, manifest.size_bytes,
             wanted.dtype)
    return _info(uri, manifest)


def ensure_merged(run: TrainerRunConfig, adapter: AdapterInfo) -> MergedModelInfo | None:
    """The merged model the spec asks for: reused when already published from this adapter, else made now."""
    if run.spec.output.merged is None:
        return None
    return existing_merged(run, adapter.digest) or publish_merged(run, adapter)
