"""Pre-flight checks beyond lengths: the rendered chat template with its loss mask, and the overfit-batch
smoke run (:mod:`kubelora.api.preflight` says why).

The loss mask is computed the way TRL 1.16 builds it for each format: messages rows through the (training
variant of the) chat template with ``return_assistant_tokens_mask`` (``{% generation %}`` markers), prompt /
completion rows as the prompt rendered with the generation prompt followed by the completion, text rows
supervised in full (EOS added as TRL does). The integration tests compare it with the labels TRL's own
SFTTrainer builds. torch and peft are imported inside the smoke run only.
"""

from __future__ import annotations

import logging
from typing import Any

from kubelora.api.preflight import (
    LOSS_CLOSE,
    LOSS_OPEN,
    RENDERED_LIMIT,
    RENDERED_ROWS,
    OverfitBatch,
    OverfitResult,
    RenderedRow,
)
from kubelora.api.reasons import Reason
from kubelora.api.runtime import EXIT_BAD_INPUT
from kubelora_trainer.data import Record
from kubelora_trainer.errors import TrainerError
from kubelora_trainer.validate import LossPlan

log = logging.getLogger(__name__)


class OverfitCheckFailedError(TrainerError):
    """preflight.overfitBatch: the loss did not fall on one batch; a retry cannot help (exit 2)."""

    reason = Reason.PREFLIGHT_FAILED.value
    exit_code = EXIT_BAD_INPUT


def _ids(encoded: Any) -> list[int]:
    return [int(x) for x in (encoded["input_ids"] if hasattr(encoded, "keys") else encoded)]


def _with_eos(tokenizer: Any, text: str) -> str:
    eos = tokenizer.eos_token or ""
    return text if text.endswith(eos) else text + eos


def loss_mask(tokenizer: Any, row: dict[str, Any], loss: LossPlan) -> tuple[list[int], list[int]]:
    """The row's token ids and a 0/1 mask of the tokens that carry the loss."""
    template = loss.chat_template
    if "chosen" in row:  # objective dpo: shown (and smoke-trained) as the prompt with its chosen answer
        implicit = "prompt" not in row  # conversations whose turns before the last answer are the prompt
        row = {"prompt": row["chosen"][:-1] if implicit else row["prompt"],
               "completion": row["chosen"][-1:] if implicit else row["chosen"]}
    if "messages" in row:
        enc = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=loss.assistant_only_loss,
                                            chat_template=template)
        ids = _ids(enc)
        mask = [int(m) for m in enc["assistant_masks"]] if loss.assistant_only_loss else [1] * len(ids)
        return ids, mask
    if "prompt" in row and isinstance(row["prompt"], list):
        prompt = _ids(tokenizer.apply_chat_template(row["prompt"], tokenize=True, return_dict=True,
                                                    add_generation_prompt=True, chat_template=template))
        full = _ids(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                                  return_dict=True, chat_template=template))
        return full, [0] * len(prompt) + [1] * (len(full) - len(prompt))
    if "prompt" in row:
        prompt = _ids(tokenizer(row["prompt"]))
        full = _ids(tokenizer(row["prompt"] + _with_eos(tokenizer, row["completion"])))
        return full, [0] * len(prompt) + [1] * (len(full) - len(prompt))
    ids = _ids(tokenizer(_with_eos(tokenizer, row["text"])))
    return ids, [1] * len(ids)


def render(tokenizer: Any, ids: list[int], mask: list[int]) -> str:
    """The decoded row with every run of supervised tokens between [[ and ]]."""
    out: list[str] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False)
            out.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if mask[start] else text)
            start = i
    return "".join(out)


def rendered_rows(tokenizer: Any, records: list[Record], loss: LossPlan, n: int = RENDERED_ROWS) -> list[RenderedRow]:
    """The first ``n`` training rows as the trainer sees them (logged, and kept in the pre-flight result)."""
    rows: list[RenderedRow] = []
    for rec in records[:n]:
        ids, mask = loss_mask(tokenizer, rec.row, loss)
        text = render(tokenizer, ids, mask)
        text = text if len(text) <= RENDERED_LIMIT else text[: RENDERED_LIMIT - 1] + "…"
        rows.append(RenderedRow(source=rec.location, text=text, tokens=len(ids), supervised=sum(mask)))
        log.info("rendered %s (%d tokens, %d supervised, supervised tokens inside [[ ]]):\n%s", rec.location,
                 len(ids), sum(mask), text)
    return rows


def overfit_batch(model: Any, tokenizer: Any, records: list[Record], loss: LossPlan, cfg: OverfitBatch,
                  lora_kwargs: dict[str, Any], learning_rate: float) -> tuple[Any, OverfitResult]:
    """Train a throwaway adapter on the first ``cfg.rows`` rows; return the base model, restored with peft's
    ``unload()`` (no LoRA module left, nothing merged), and what the losses did."""
    import torch
    from peft import LoraConfig, get_peft_model

    rows = records[: cfg.rows]
    encoded = [loss_mask(tokenizer, r.row, loss) for r in rows]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in encoded], device=device)
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in encoded], device=device)
    labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask, strict=True)] + [-100] * (width - len(ids))
                           for ids, mask in encoded], device=device)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    losses: list[float] = []
    peft_model.train()
    try:
        for _ in range(cfg.steps):
            out = peft_model(input_ids=input_ids, attention_mask=attention, labels=labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
    finally:
        base = peft_model.unload()
    first, final = losses[0], losses[-1]
    bounds: list[str] = []
    if cfg.max_loss is not None and not final <= cfg.max_loss:
        bounds.append(f"above maxLoss {cfg.max_loss:g}")
    if cfg.min_reduction is not None and not final <= (1 - cfg.min_reduction) * first:
        bounds.append(f"not {cfg.min_reduction:.0%} below the first step's loss")
    what = f"loss {first:.4f} -> {final:.4f} after {cfg.steps} steps on {len(rows)} row(s)"
    message = what if not bounds else (
        f"{what}: {' and '.join(bounds)}. The setup cannot fit even one batch: check the loss mask in the "
        "rendered rows above, lora.targetModules and the learning rate (preflight.overfitBatch.learningRate)")
    log.info("overfit-batch check: %s", message)
    return base, OverfitResult(steps=cfg.steps, rows=len(rows), first_loss=round(first, 4),
                               final_loss=round(final, 4), passed=not bounds, message=message)
