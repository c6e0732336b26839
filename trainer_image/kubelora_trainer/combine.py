"""``spec.combine``: combine published adapters into one standard adapter (peft ``add_weighted_adapter``).

Pre-flight (``--validate-only``) fetches every input, checks its digest (the operator pinned a loraJobRef
input to what its LoRAJob published; a uri input may carry its own pin) and that the inputs can be
combined: all LoRA, all trained on ``spec.baseModel``, one rank for the element-wise methods. The run
loads the base once, attaches each input, lets peft combine them into the adapter ``default`` and publishes
it like a trained adapter; its manifest lists each input's uri, digest and weight.

DARE drops weights at random: the generator is seeded with ``spec.training.seed`` so a retried pod
publishes the same adapter.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubelora.api.combine import DENSITY_METHODS, SAME_RANK_METHODS, CombinedInputRecord, ResolvedInput
from kubelora.api.digest import digest_of, hash_tree
from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.reasons import Reason
from kubelora.api.runtime import MANIFEST_FILE, AdapterManifest, TrainerResult, TrainerRunConfig
from kubelora.api.uris import FileURI, HfURI, PvcURI, URIError, parse_uri
from kubelora_trainer.errors import InvalidSpecError
from kubelora_trainer.merge import ensure_merged
from kubelora_trainer.modelload import load_tokenizer, resolve_base_model
from kubelora_trainer.publish import existing_adapter, publish_adapter, verify_adapter_dir
from kubelora_trainer.storage import download_dir, locate

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
"""What an https:// input without a manifest is fetched as (https cannot list a folder)."""


@dataclass(frozen=True)
class FetchedInput:
    """One input adapter, local and verified."""

    item: ResolvedInput
    path: Path
    config: dict[str, Any]
    manifest: AdapterManifest | None
    digest: str

    def label(self, index: int) -> str:
        return f"input {index + 1} ({self.item.source or self.item.uri})"


def _fetch_files(item: ResolvedInput, dest: Path) -> Path:
    loc = locate(item.uri)
    if loc.is_local:
        return Path(loc.path)
    if loc.fs.exists(loc.child(MANIFEST_FILE)):
        listed = json.loads(loc.fs.cat_file(loc.child(MANIFEST_FILE)))["files"]
        return download_dir(loc, dest, include=(MANIFEST_FILE, *listed))
    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        if loc.fs.exists(loc.child(name)):
            loc.fs.get(loc.child(name), str(dest / name))
    return dest


def fetch_input(item: ResolvedInput, work: Path, index: int) -> FetchedInput:
    """Fetch and verify one input; every problem is bad input (InvalidSpec), never worth a retry."""
    where = f"spec.combine.inputs[{index}] {item.source or item.uri}"
    try:
        path = _fetch_files(item, work / f"input-{index}")
    except (OSError, ValueError) as exc:
        raise InvalidSpecError(f"{where} cannot be read: {exc}") from exc
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise InvalidSpecError(f"{where} has no adapter_config.json: not a peft adapter folder")
    manifest = None
    try:
        if (path / MANIFEST_FILE).is_file():
            manifest = verify_adapter_dir(path)
            digest = manifest.digest
        else:
            digest = digest_of(hash_tree(path))
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidSpecError(f"{where} does not verify: {exc}") from exc
    if item.digest and item.digest != digest:
        raise InvalidSpecError(f"{where} has digest {digest}, but {item.digest} is pinned: the adapter changed "
                               "since it was named. Fix: pin the new digest, or re-create the LoRAJob to re-resolve")
    return FetchedInput(item, path, config, manifest, digest)


def base_aliases(value: str) -> set[str]:
    """Spellings of one base model: a URI, its path in the pod (pvc/file) and its repo id (hf)."""
    raw = value.strip().rstrip("/")
    out = {raw}
    try:
        parsed = parse_uri(raw) if "://" in raw else None
    except URIError:
        parsed = None
    if isinstance(parsed, PvcURI | FileURI):
        out.add(parsed.local_path().rstrip("/"))
    elif isinstance(parsed, HfURI):
        out.add(parsed.repo)
    return out


def check_combinable(spec: LoRAJobSpec, inputs: list[FetchedInput]) -> None:
    """Refuse inputs that peft cannot combine, or whose combination would be meaningless; names every problem."""
    combine = spec.combine
    assert combine is not None
    base = base_aliases(spec.base_model.uri)
    problems: list[str] = []
    for i, fetched in enumerate(inputs):
        cfg = fetched.config
        if str(cfg.get("peft_type") or "").upper() != "LORA":
            problems.append(f"{fetched.label(i)} is peft_type {cfg.get('peft_type')!r}, not LORA")
        declared = fetched.manifest.base_model if fetched.manifest else str(cfg.get("base_model_name_or_path") or "")
        if not declared or not (base_aliases(declared) & base):
            problems.append(f"{fetched.label(i)} was trained on {declared or 'an unrecorded base model'}, not "
                            f"spec.baseModel.uri {spec.base_model.uri}")
        if cfg.get("use_dora"):
            problems.append(f"{fetched.label(i)} is a DoRA adapter; its magnitude vectors cannot be combined")
    ranks = [max([int(f.config.get("r") or 0), *map(int, (f.config.get("rank_pattern") or {}).values())])
             for f in inputs]
    if combine.method in SAME_RANK_METHODS and len(set(ranks)) > 1:
        problems.append(f"ranks differ ({', '.join(map(str, ranks))}): {combine.method} adds the inputs' matrices "
                        "element by element, so every input needs the same rank; use method cat, or inputs of one rank")
    kinds = {type(f.config.get("target_modules")).__name__ for f in inputs}
    if len(kinds) > 1:
        problems.append("target_modules is a list in some inputs and a pattern string in others; peft cannot "
                        "combine them")
    if problems:
        raise InvalidSpecError("spec.combine.inputs cannot be combined: " + "; ".join(problems))


def fetch_all(run: TrainerRunConfig, work: Path) -> list[FetchedInput]:
    spec = run.spec
    assert spec.combine is not None
    if len(run.combine_inputs) != len(spec.combine.inputs):
        raise InvalidSpecError(f"the run config resolves {len(run.combine_inputs)} of spec.combine's "
                               f"{len(spec.combine.inputs)} inputs (an operator that does not know spec.combine?)")
    inputs = [fetch_input(item, work, i) for i, item in enumerate(run.combine_inputs)]
    check_combinable(spec, inputs)
    return inputs


def validate_only(run: TrainerRunConfig) -> TrainerResult:
    spec = run.spec
    assert spec.combine is not None
    with tempfile.TemporaryDirectory(prefix="kubelora-combine-") as work:
        inputs = fetch_all(run, Path(work))
    resolve_base_model(spec.base_model.uri, tokenizer_only=True)
    digests = ", ".join(f.digest[:19] for f in inputs)
    return TrainerResult(ok=True, reason=Reason.VALIDATION_PASSED.value,
                         message=f"{len(inputs)} adapters can be combined with {spec.combine.method} ({digests})")


def combine_adapters(run: TrainerRunConfig, inputs: list[FetchedInput], ref: Any) -> Any:
    """The base with every input attached and their combination as the active adapter ``default``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    combine = run.spec.combine
    assert combine is not None
    # bf16 halves the base's memory; peft keeps the adapters' weights (and so the arithmetic) in float32.
    base = AutoModelForCausalLM.from_pretrained(ref.name_or_path, dtype=torch.bfloat16, device_map="cpu",
                                                **ref.pretrained_kwargs())
    names = [f"input_{i}" for i in range(len(inputs))]
    model = PeftModel.from_pretrained(base, str(inputs[0].path), adapter_name=names[0])
    for name, fetched in zip(names[1:], inputs[1:], strict=True):
        model.load_adapter(str(fetched.path), adapter_name=name)
    torch.manual_seed(run.spec.training.seed)  # DARE's random drop
    model.add_weighted_adapter(
        names, [f.item.weight for f in inputs], adapter_name="default", combination_type=combine.method,
        density=combine.density if combine.method in DENSITY_METHODS else None,
        majority_sign_method=combine.majority_sign_method)
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    return model


def combine(run: TrainerRunConfig) -> TrainerResult:
    """Combine, publish (and merge, if asked); reuse a published result of this revision that verifies."""
    spec = run.spec
    assert spec.combine is not None
    done = existing_adapter(run)
    if done is not None:
        manifest, info = done
        return TrainerResult(ok=True, reason=Reason.COMPLETED.value, message="adapter already published",
                             adapter=info, merged=ensure_merged(run, info), metrics=manifest.metrics)
    with tempfile.TemporaryDirectory(prefix="kubelora-combine-") as work:
        inputs = fetch_all(run, Path(work))
        ref = resolve_base_model(spec.base_model.uri, tokenizer_only=False)
        tokenizer = load_tokenizer(ref)
        model = combine_adapters(run, inputs, ref)
        records = [CombinedInputRecord(uri=f.item.uri, digest=f.digest, weight=f.item.weight, source=f.item.source)
                   for f in inputs]
        metrics = {"inputs": float(len(inputs))}
        _, info = publish_adapter(model, tokenizer, run, metrics, loaded_from=ref.name_or_path,
                                  manifest_extra={"inputs": records, "combine_method": spec.combine.method})
    log.info("combined %d adapters with %s into %s (%s)", len(inputs), spec.combine.method, info.uri, info.digest)
    return TrainerResult(ok=True, reason=Reason.COMPLETED.value,
                         message=f"combined {len(inputs)} adapters with {spec.combine.method}; adapter {info.uri}",
                         adapter=info, merged=ensure_merged(run, info), metrics=metrics)
