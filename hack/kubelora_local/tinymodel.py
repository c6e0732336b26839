"""Tiny random-init causal LMs and chat data, built locally so tests never touch the Hugging Face Hub.

Shared by the trainer, agent and engine tests. Stable API:

- ``build_tiny_model(dest, arch="llama") -> Path``: a ~100k-parameter Llama or Qwen2 plus a byte-level
  BPE tokenizer whose chat template has ``{% generation %}`` markers (needed for assistant-only loss);
  saved with ``save_pretrained`` so ``AutoModelForCausalLM/AutoTokenizer.from_pretrained(dest)`` work.
- ``write_chat_dataset(path, n=64, seed=0, fmt="messages", long_tail=False) -> Path``: a JSON Lines file.
- ``sample_rows(n, seed, fmt, long_tail) -> list[dict]``: the same rows in memory.

The data is a small, learnable task (fixed question -> fixed answer pairs), so a few optimizer steps
visibly lower the loss. Building a model takes ~0.5 s; heavy imports happen inside the functions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_FACTS = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
    ("Where do fish live?", "Fish live in water."),
    ("What do cats say?", "Cats say meow."),
    ("How many legs has a dog?", "A dog has four legs."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which planet do we live on?", "We live on the planet Earth."),
]
_FILLER = [
    "please",
    "answer",
    "briefly",
    "and",
    "clearly",
    "because",
    "this",
    "is",
    "a",
    "small",
    "test",
    "of",
    "the",
    "trainer",
    "with",
    "a",
    "few",
    "more",
    "words",
    "to",
    "make",
    "the",
    "prompt",
    "longer",
]
_SYSTEM = "You are a helpful assistant."


def _corpus() -> list[str]:
    texts = [f"{q} {a}" for q, a in _FACTS] + [" ".join(_FILLER), _SYSTEM, "system user assistant"]
    return texts * 20


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer (vocab 512) with the chat template above; pad and eos are distinct."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _corpus(),
        trainer=trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        unk_token="<|unk|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|eos|>"],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build_tiny_model(
    dest: Path,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> Path:
    """Save a random-init ``arch`` ("llama" or "qwen2") model plus tokenizer to ``dest``; return ``dest``.

    With the usual ``initializer_range`` (0.02) the frozen tied embeddings keep every logit near zero,
    so no adapter can make the model say anything; the demo raises it so a LoRA can learn real answers.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(arch)
    if config_cls is None:
        raise ValueError(f"unknown arch {arch!r}; use 'llama' or 'qwen2'")
    cfg = config_cls(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def sample_rows(n: int = 64, seed: int = 0, fmt: str = "messages", long_tail: bool = False) -> list[dict[str, Any]]:
    """``n`` rows in ``fmt`` ("messages", "prompt-completion" or "text").

    ``long_tail=True`` pads most prompts with a little filler and a few with a lot, giving the mixed,
    long-tailed lengths of real chat data (what batching strategies are compared on).
    """
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        q, a = _FACTS[i % len(_FACTS)]
        if long_tail:
            k = rng.choice([0, 0, 2, 4, 8, 16]) if rng.random() < 0.85 else rng.randint(40, 120)
            filler = " ".join(rng.choice(_FILLER) for _ in range(k))
            q = f"{filler} {q}".strip()
        if fmt == "messages":
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 3 == 0:
                msgs.insert(0, {"role": "system", "content": _SYSTEM})
            rows.append({"messages": msgs})
        elif fmt == "prompt-completion":
            rows.append({"prompt": q, "completion": " " + a})
        elif fmt == "text":
            rows.append({"text": f"{q} {a}"})
        else:
            raise ValueError(f"unknown format {fmt!r}")
    return rows


def write_chat_dataset(path: Path, n: int = 64, seed: int = 0, fmt: str = "messages", long_tail: bool = False) -> Path:
    """Write ``sample_rows(...)`` as JSON Lines to ``path``; return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in sample_rows(n, seed, fmt, long_tail):
            fh.write(json.dumps(row) + "\n")
    return path
