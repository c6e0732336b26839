"""The model card (``README.md``) published with every adapter.

peft's ``save_pretrained`` writes an empty template card; this one says what a reader of the adapter
folder (a person, the Hub, a merge script) needs and cannot get from ``adapter_config.json``: which
base model and exact data (dataset digest) the adapter was trained on, the LoRA and training
hyperparameters, and the final metrics. It is an ordinary adapter file, listed in the KubeLoRA manifest
and covered by the adapter digest like the weights.

Pure string building: no torch, unit-testable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubelora.api.runtime import MANIFEST_FILE, TrainerRunConfig
from kubelora.api.uris import HfURI, URIError, parse_uri

CARD_FILE = "README.md"


def _hub_repo(uri: str) -> str | None:
    try:
        parsed = parse_uri(uri)
    except URIError:
        return None
    return parsed.repo if isinstance(parsed, HfURI) else None


def _front_matter(base_repo: str | None) -> str:
    # The Hub reads these keys; base_model must be a Hub repo id, so it is left out for other sources.
    lines = ["---", "library_name: peft", "pipeline_tag: text-generation", "tags:", "- lora", "- kubelora"]
    if base_repo:
        lines.append(f"base_model: {base_repo}")
    return "\n".join([*lines, "---", ""])


def _table(rows: Mapping[str, Any]) -> list[str]:
    out = ["| | |", "|---|---|"]
    out.extend(f"| {key} | `{value}` |" for key, value in rows.items())
    return out


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _combined_from(run: TrainerRunConfig) -> dict[str, Any]:
    """A combined adapter's "dataset": the method and each input adapter (uri, pinned digest, weight)."""
    combine = run.spec.combine
    assert combine is not None
    rows: dict[str, Any] = {"combined by": f"{combine.method} (density {combine.density:g})"}
    for i, item in enumerate(run.combine_inputs, 1):
        rows[f"input {i}"] = f"{item.uri} {item.digest or ''} weight {item.weight:g}"
    return rows


def render_card(run: TrainerRunConfig, config: Mapping[str, Any], metrics: Mapping[str, float],
                dataset_digest: str) -> str:
    """The card for the adapter of ``run``; ``config`` is the adapter_config.json as published."""
    spec = run.spec
    base_repo = _hub_repo(spec.base_model.uri)
    loaded = str(config.get("base_model_name_or_path") or "")
    lora = {
        "r": config.get("r", spec.lora.r),
        "lora_alpha": config.get("lora_alpha", spec.lora.alpha),
        "lora_dropout": config.get("lora_dropout", spec.lora.dropout),
        "target_modules": json.dumps(config.get("target_modules")),
        "use_rslora": config.get("use_rslora", spec.lora.use_rslora),
        "use_dora": config.get("use_dora", spec.lora.use_dora),
    }
    t = spec.training
    training: dict[str, Any] = {"method": spec.method}
    if spec.method == "qlora" and spec.effective_quantization:
        q = spec.effective_quantization
        training["quantization"] = f"{q.quant_type}, double_quant={q.double_quant}, compute {q.compute_dtype}"
    training.update({
        "epochs": t.epochs, "max_steps": t.max_steps, "learning_rate": t.learning_rate, "scheduler": t.scheduler,
        "warmup_ratio": t.warmup_ratio, "batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps, "max_seq_length": t.max_seq_length,
        "packing": t.packing, "optimizer": t.optimizer, "seed": t.seed,
        "nodes x gpus": f"{spec.resources.nodes} x {spec.resources.gpus}",
    })
    data = spec.dataset
    dataset: dict[str, Any] = ({"uri": data.uri, "digest": dataset_digest or "unknown", "format": data.format}
                               if data is not None else _combined_from(run))
    if data is not None and data.eval_uri:
        dataset["evalUri"] = data.eval_uri
    load_from = base_repo or loaded or spec.base_model.uri
    lines = [
        _front_matter(base_repo),
        f"# {run.name}: a LoRA adapter for {load_from}",
        "",
        f"Trained by KubeLoRA from LoRAJob `{run.namespace}/{run.name}`, revision {run.revision}. The files of this "
        f"folder and their digest are listed in `{MANIFEST_FILE}`.",
        "",
        "## Base model",
        "",
        *_table({"KubeLoRA URI": spec.base_model.uri, "base_model_name_or_path": loaded or "(not recorded)"}),
        "",
        "## Dataset",
        "",
        "The digest is the sha256 of the `sha256sum` listing of the data files read (evalUri files under `eval/`).",
        "",
        *_table(dataset),
        "",
        "## LoRA",
        "",
        *_table(lora),
        "",
        "## Training",
        "",
        *_table(training),
        "",
        "## Final metrics",
        "",
        *(_table({k: _fmt(v) for k, v in sorted(metrics.items())}) if metrics else ["(none recorded)"]),
        "",
        "## Use",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)
