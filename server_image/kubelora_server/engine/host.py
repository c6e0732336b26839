"""One base model, its LoRA adapters, and generation - all behind one lock.

peft keeps several adapters in one model and switches with ``set_adapter`` (the base is served inside
``disable_adapter()``). Switching mutates the shared model, so generation, loading and unloading are
serialised by a lock: one request at a time, which is what a CPU with one model instance can do anyway.

Adapters get internal peft names (``lora1``, ``lora2``...) because peft module names cannot contain the
dots that adapter names may (``support.v2``), and because a new version can then be loaded beside the old
one and swapped in only when it loaded (``load_inplace`` never leaves the name without an adapter).

Registration is not residency, as in vLLM: any number of names can be registered; at most
``--max-cpu-loras`` adapters' weights are kept in the model, least recently used evicted first, and a
registered adapter that was evicted is read from its path again when a request names it. A load is
checked as vLLM checks it (:mod:`kubelora_server.peft_rules`, the same messages) and loaded once to
prove the weights fit, so what vLLM refuses this engine refuses with vLLM's 400.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubelora.api.uris import FileURI, HfURI, PvcURI, URIError, parse_uri
from kubelora_server.engine.config import EngineArgs
from kubelora_server.engine.protocol import EngineError, FinishReason, model_not_found
from kubelora_server.engine.sampling import SamplingParams, TextAssembler, choose_token
from kubelora_server.peft_rules import vllm_refusal_message

log = logging.getLogger(__name__)
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model: str) -> tuple[str, str | None]:
    """``(path or hub id, revision)`` for ``--model``: pvc:// and file:// URIs become local paths."""
    if "://" not in model:
        return model, None
    try:
        uri = parse_uri(model)
    except URIError as exc:
        raise SystemExit(f"--model: {exc}") from None
    if isinstance(uri, PvcURI | FileURI):
        return uri.local_path(), None
    if isinstance(uri, HfURI):
        return uri.repo, uri.revision
    raise SystemExit(f"--model {model}: the CPU engine reads pvc://, file:// or hf:// models; copy "
                     f"{uri.scheme}:// models to a volume first")


def add_failed(message: str) -> EngineError:
    """vLLM v0.34's answer when ``add_lora`` raised anything but "No adapter found": the exception's text as a
    500 InternalServerError (``OpenAIServingModels.load_lora_adapter``; releases before v0.12 said 400)."""
    return EngineError(500, "InternalServerError", message)


@dataclass(frozen=True)
class Adapter:
    name: str
    path: str
    rank: int
    created: int


@dataclass(frozen=True)
class Delta:
    """A piece of generated text; ``finish`` is set on the last one."""

    text: str
    finish: FinishReason = None
    completion_tokens: int = 0


class ModelHost:
    def __init__(self, args: EngineArgs) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.args = args
        path, revision = resolve_model_path(args.model)
        revision = revision or args.revision
        started = time.monotonic()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(args.tokenizer or path, revision=revision)
        model: Any = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=_DTYPES[args.dtype])
        model.eval()
        self._base: Any = model
        self._peft: Any = None
        limit = getattr(model.config, "max_position_embeddings", None)
        if args.max_model_len is not None and limit is not None and args.max_model_len > limit:
            raise SystemExit(f"--max-model-len {args.max_model_len} exceeds the model's "
                             f"max_position_embeddings {limit}")
        self.max_model_len: int = args.max_model_len or limit or 2048
        self.eos_ids = self._eos_ids(model)
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._adapters: dict[str, Adapter] = {}
        self._resident: OrderedDict[str, str] = OrderedDict()
        """adapter name -> peft adapter name, least recently used first (vLLM's LRU of --max-cpu-loras)."""
        self._ids = itertools.count(1)
        self._counts = threading.Lock()
        self.waiting: dict[str, int] = {}
        """requests queued for the model, by model name (what vLLM's scheduler calls waiting)."""
        self.running: dict[str, int] = {}
        self.adapter_requests_seen = False
        """vLLM publishes vllm:lora_requests_info only once an adapter request has been scheduled."""
        if args.enable_lora:
            import peft  # noqa: F401 - seconds of imports paid before /health answers, not on the first load
        log.info("loaded %s (%s) in %.1fs; max_model_len %d", args.model, path, time.monotonic() - started,
                 self.max_model_len)

    def _eos_ids(self, model: Any) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    # ---- adapters --------------------------------------------------------------------------------------

    def adapters(self) -> list[Adapter]:
        return list(self._adapters.values())

    def resolve(self, model: str | None) -> Adapter | None:
        """``None`` for the base model, the adapter for an adapter name; 404 otherwise (like vLLM)."""
        if not model or model == self.args.served_model_name:
            return None
        adapter = self._adapters.get(model)
        if adapter is None:
            raise model_not_found(model)
        return adapter

    def load_adapter(self, name: str, path: str, inplace: bool = False) -> None:
        """vLLM's checks and messages, then peft. Raises :class:`EngineError`."""
        if not name or not path:
            raise EngineError(400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided.")
        if not self.args.enable_lora:
            raise EngineError(400, "BadRequestError", "LoRA is not enabled: start the server with --enable-lora.")
        if name == self.args.served_model_name:
            raise EngineError(400, "InvalidUserInput", f"The lora adapter '{name}' conflicts with a served base model.")
        if name in self._adapters and not inplace:
            raise EngineError(400, "InvalidUserInput", f"The lora adapter '{name}' has already been loaded. "
                              "If you want to load the adapter in place, set 'load_inplace' to True.")
        config = self._read_adapter_config(name, path)
        rank = max([int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())])
        with self._lock:
            if name in self._adapters and not inplace:
                raise EngineError(400, "InvalidUserInput", f"The lora adapter '{name}' has already been loaded.")
            peft_name = f"lora{next(self._ids)}"
            self._peft_load(name, path, peft_name)
            old = self._resident.pop(name, None)
            self._adapters[name] = Adapter(name, path, rank, int(time.time()))
            self._resident[name] = peft_name
            if old is not None:
                self._peft_delete(old)
            self._evict()
        log.info("loaded LoRA adapter %s (rank %d) from %s", name, rank, path)

    def resident(self) -> list[str]:
        """Adapters whose weights are in the model, least recently used first."""
        return list(self._resident)

    def _evict(self) -> None:
        """Drop least recently used weights beyond --max-cpu-loras (the most recent one always stays)."""
        while len(self._resident) > max(1, self.args.max_cpu_loras):
            name, peft_name = self._resident.popitem(last=False)
            self._peft_delete(peft_name)
            log.info("evicted LoRA adapter %s from memory (still registered)", name)

    def _activate(self, adapter: Adapter) -> str:
        """The peft name serving ``adapter``, reading it from disk again if it was evicted. Holds the lock."""
        peft_name = self._resident.get(adapter.name)
        if peft_name is not None:
            self._resident.move_to_end(adapter.name)
            return peft_name
        peft_name = f"lora{next(self._ids)}"
        self._peft_load(adapter.name, adapter.path, peft_name)
        self._resident[adapter.name] = peft_name
        self._evict()
        return peft_name

    def _read_adapter_config(self, name: str, path: str) -> dict[str, Any]:
        """vLLM's reading: no adapter_config.json is "No adapter found" (404); anything wrong with a folder
        that has one is refused with the error's own text (:func:`add_failed`), as ``add_lora`` raised it."""
        directory = Path(path)
        config_file = directory / "adapter_config.json"
        if not config_file.is_file():
            raise EngineError(404, "NotFoundError", f"Loading lora {name} failed: No adapter found for {path}")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise add_failed(str(exc)) from None
        if not isinstance(config, dict):
            raise add_failed(f"{config_file} is not a JSON object")
        refused = vllm_refusal_message(config, self.args.max_lora_rank)
        if refused is not None:
            raise add_failed(refused)
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise add_failed(f"Loading lora {name} failed: peft_type "
                              f"{config.get('peft_type')!r} is not LORA")
        if not any((directory / w).is_file() for w in WEIGHT_FILES):
            raise add_failed(f"{path} doesn't contain tensors")
        return config

    def _peft_load(self, name: str, path: str, peft_name: str) -> None:
        from peft import PeftModel

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(self._base, path, adapter_name=peft_name,
                                                           is_trainable=False)
                else:
                    self._peft.load_adapter(path, adapter_name=peft_name, is_trainable=False)
        except Exception as exc:
            log.warning("peft could not load %s from %s: %s", name, path, exc)
            if self._peft is not None and peft_name in self._peft.peft_config:
                self._peft_delete(peft_name)
            raise add_failed(f"Loading lora {name} failed: {exc}") from None

    def _peft_delete(self, peft_name: str) -> None:
        if self._peft is None:
            return
        if set(self._peft.peft_config) <= {peft_name}:
            self._base = self._peft.unload()
            self._peft = None
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "adapter was active which is now deleted": expected
            self._peft.delete_adapter(peft_name)

    def unload_adapter(self, name: str) -> None:
        if not name:
            raise EngineError(400, "InvalidUserInput", "'lora_name' needs to be provided to unload a LoRA adapter.")
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise EngineError(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
            peft_name = self._resident.pop(name, None)
            if peft_name is not None:
                self._peft_delete(peft_name)
        log.info("unloaded LoRA adapter %s", name)

    # ---- prompts ---------------------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise EngineError(400, "BadRequestError", "The model's tokenizer has no chat template; "
                              "use /v1/completions.")
        encoded: Any = self.tokenizer.apply_chat_template(list(messages),
                                                          add_generation_prompt=add_generation_prompt, tokenize=True)
        ids: Any = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(i) for i in ids]

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return [int(i) for i in prompt]
        return [int(i) for i in self.tokenizer(prompt)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def max_tokens_for(self, prompt_len: int, requested: int | None) -> int:
        """vLLM's length rule: prompt + completion must fit in max_model_len."""
        if requested is None:
            requested = self.max_model_len - prompt_len
        if prompt_len + requested > self.max_model_len or requested < 1:
            raise EngineError(400, "BadRequestError",
                              f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                              f"requested {prompt_len + max(requested, 0)} tokens ({prompt_len} in the messages, "
                              f"{max(requested, 0)} in the completion). Please reduce the length of the messages "
                              "or completion.")
        return requested

    # ---- generation ------------------------------------------------------------------------------------

    def generate(self, model: str | None, prompt: list[int], params: SamplingParams,
                 cancel: threading.Event | None = None) -> Iterator[Delta]:
        """Text deltas for one completion; the last has ``finish`` set. Holds the lock until exhausted."""
        key = model or self.args.served_model_name
        self._count(self.waiting, key, 1)
        queued = True
        try:
            with self._lock:
                self._count(self.waiting, key, -1)
                queued = False
                self._count(self.running, key, 1)
                try:
                    yield from self._generate_locked(model, prompt, params, cancel)
                finally:
                    self._count(self.running, key, -1)
        finally:
            if queued:
                self._count(self.waiting, key, -1)

    def _count(self, table: dict[str, int], key: str, by: int) -> None:
        with self._counts:
            table[key] = table.get(key, 0) + by
            if table[key] <= 0:
                del table[key]
            if by > 0 and key != self.args.served_model_name:
                self.adapter_requests_seen = True

    def _generate_locked(self, model: str | None, prompt: list[int], params: SamplingParams,
                         cancel: threading.Event | None) -> Iterator[Delta]:
        adapter = self.resolve(model)
        if adapter is not None:
            peft_name = self._activate(adapter)  # may read evicted weights back (and create the PeftModel)
            self._peft.set_adapter(peft_name)
            yield from self._decode_loop(self._peft, prompt, params, cancel)
        elif self._peft is not None:
            with self._peft.disable_adapter():
                yield from self._decode_loop(self._peft, prompt, params, cancel)
        else:
            yield from self._decode_loop(self._base, prompt, params, cancel)

    def _decode_loop(self, net: Any, prompt: list[int], params: SamplingParams,
                     cancel: threading.Event | None) -> Iterator[Delta]:
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else self.args.seed)
        text = TextAssembler(self.decode, params.stop)
        finish: FinishReason = "length"
        produced = 0
        past = None
        step_input = torch.tensor([prompt], dtype=torch.long)
        with torch.inference_mode():
            while produced < params.max_tokens:
                if cancel is not None and cancel.is_set():
                    return
                out = net(input_ids=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = choose_token(out.logits[0, -1], params, generator)
                produced += 1
                if token in self.eos_ids and not params.ignore_eos:
                    finish = "stop"
                    break
                delta = text.add(token)
                if text.stopped:
                    finish = "stop"
                    if delta:
                        yield Delta(delta)
                    break
                if delta:
                    yield Delta(delta)
                step_input = torch.tensor([[token]], dtype=torch.long)
        yield Delta(text.finish(), finish, produced)
