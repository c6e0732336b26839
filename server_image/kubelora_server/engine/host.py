"""One base model, its LoRA adapters, and the requests for them.

peft keeps several adapters in one model; the :class:`~kubelora_server.engine.scheduler.Scheduler` thread
runs every forward pass, each batch row through its own adapter, and applies loads and unloads between two
steps, so nothing else mutates the model and a load never waits for a whole generation.

Adapters get internal peft names (``lora1``, ``lora2``...) because peft module names cannot contain the
dots that adapter names may (``support.v2``), and because a new version can then be loaded beside the old
one and swapped in only when it loaded (``load_inplace`` never leaves the name without an adapter). A
replaced or unloaded version is retired: its weights are deleted once no running request uses them.

Registration is not residency, as in vLLM: any number of names can be registered; at most
``--max-cpu-loras`` adapters' weights are kept in the model, least recently used evicted first (never one a
running request uses), and a registered adapter that was evicted is read from its path again when a request
names it. A load is checked as vLLM checks it (:mod:`kubelora_server.peft_rules`, the same messages) and
loaded once to prove the weights fit, so what vLLM refuses this engine refuses in vLLM's words.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubelora.api.uris import FileURI, HfURI, PvcURI, URIError, parse_uri
from kubelora_server.engine.config import EngineArgs
from kubelora_server.engine.protocol import EngineError, model_not_found
from kubelora_server.engine.sampling import SamplingParams, TextAssembler
from kubelora_server.engine.scheduler import AdapterRouting, Emit, Scheduler
from kubelora_server.engine.scheduler import Sequence as Seq
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
        self._token_texts: dict[int, str] = {}
        self.created = int(time.time())
        self._adapters: dict[str, Adapter] = {}
        self._resident: OrderedDict[str, str] = OrderedDict()
        """adapter name -> peft adapter name, least recently used first (vLLM's LRU of --max-cpu-loras)."""
        self._retired: set[str] = set()
        """peft names of replaced or unloaded versions, deleted once no running request uses them."""
        self._ids = itertools.count(1)
        self._counts = threading.Lock()
        self.waiting: dict[str, int] = {}
        """requests queued for the model, by model name (what vLLM's scheduler calls waiting)."""
        self.running: dict[str, int] = {}
        self.adapter_requests_seen = False
        """vLLM publishes vllm:lora_requests_info only once an adapter request has been scheduled."""
        if args.enable_lora:
            import peft  # noqa: F401 - seconds of imports paid before /health answers, not on the first load
        self.routing = AdapterRouting()
        self.scheduler = Scheduler(self, args.max_num_seqs)
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
        self.scheduler.call(lambda: self._install(name, path, rank, inplace))
        log.info("loaded LoRA adapter %s (rank %d) from %s", name, rank, path)

    def _install(self, name: str, path: str, rank: int, inplace: bool) -> None:
        """On the scheduler thread: peft loads the weights, then the name points at them."""
        if name in self._adapters and not inplace:
            raise EngineError(400, "InvalidUserInput", f"The lora adapter '{name}' has already been loaded.")
        peft_name = f"lora{next(self._ids)}"
        self._peft_load(name, path, peft_name)
        old = self._resident.pop(name, None)
        self._adapters[name] = Adapter(name, path, rank, int(time.time()))
        self._resident[name] = peft_name
        if old is not None:
            self._retired.add(old)
        self._evict(self.scheduler.in_use())

    def resident(self) -> list[str]:
        """Adapters whose weights are in the model, least recently used first."""
        return list(self._resident)

    def _evict(self, in_use: set[str]) -> None:
        """Drop least recently used weights beyond --max-cpu-loras, never the most recent one nor one a running
        request uses (vLLM's --max-cpu-loras >= --max-loras makes room for the whole batch)."""
        while len(self._resident) > max(1, self.args.max_cpu_loras):
            victim = next((n for n, p in list(self._resident.items())[:-1] if p not in in_use), None)
            if victim is None:
                return
            self._retired.add(self._resident.pop(victim))
            log.info("evicted LoRA adapter %s from memory (still registered)", victim)
        self.collect_retired(in_use)

    def activate(self, name: str, in_use: set[str]) -> str:
        """On the scheduler thread: the peft name serving adapter ``name``, read from disk again if it was
        evicted; 404 when it was unloaded after the request was accepted."""
        adapter = self._adapters.get(name)
        if adapter is None:
            raise model_not_found(name)
        peft_name = self._resident.get(name)
        if peft_name is not None:
            self._resident.move_to_end(name)
            return peft_name
        peft_name = f"lora{next(self._ids)}"
        self._peft_load(name, adapter.path, peft_name)
        self._resident[name] = peft_name
        self._evict(in_use | {peft_name})
        return peft_name

    def collect_retired(self, in_use: set[str]) -> None:
        """On the scheduler thread: delete retired weights no running request uses any more."""
        for peft_name in sorted(self._retired - in_use):
            self._retired.discard(peft_name)
            self._peft_delete(peft_name)

    @property
    def peft_model(self) -> Any:
        return self._peft

    @property
    def base_model(self) -> Any:
        return self._base

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
        self.routing.attach(self._peft)

    def _peft_delete(self, peft_name: str) -> None:
        if self._peft is None:
            return
        if set(self._peft.peft_config) <= {peft_name}:
            self._base = self._peft.unload()
            self._peft = None
            self.routing.detach_all()
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "adapter was active which is now deleted": expected
            self._peft.delete_adapter(peft_name)
        self.routing.forget()

    def unload_adapter(self, name: str) -> None:
        if not name:
            raise EngineError(400, "InvalidUserInput", "'lora_name' needs to be provided to unload a LoRA adapter.")
        self.scheduler.call(lambda: self._remove(name))
        log.info("unloaded LoRA adapter %s", name)

    def _remove(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise EngineError(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
        peft_name = self._resident.pop(name, None)
        if peft_name is not None:
            self._retired.add(peft_name)
        self.collect_retired(self.scheduler.in_use())

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
        ids = [int(i) for i in prompt] if isinstance(prompt, list) else [
            int(i) for i in self.tokenizer(prompt)["input_ids"]]
        # vLLM's input processor refuses these before the model sees them (a forward pass of no tokens or of
        # an id past the embedding would crash the step); found by the schemathesis fuzz (issue 14).
        if not ids:
            raise EngineError(400, "BadRequestError", "The decoder prompt cannot be empty")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise EngineError(400, "BadRequestError", f"Token id {max(bad, key=abs)} is out of vocabulary")
        return ids

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def token_text(self, token_id: int) -> str:
        """One token's text as vLLM's logprobs show it (special tokens included)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = str(self.tokenizer.decode([token_id]))
        return text

    @property
    def vocab_size(self) -> int:
        return int(getattr(self._base.config, "vocab_size", None) or len(self.tokenizer))

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

    def submit(self, model: str | None, prompt: list[int], params: SamplingParams, emit: Emit,
               cancel: threading.Event) -> None:
        """Queue one completion; ``emit`` gets its deltas (on the scheduler thread), then ``None``.
        ``model`` must have passed :meth:`resolve`."""
        adapter = self.resolve(model)
        key = model or self.args.served_model_name
        seed = params.seed if params.seed is not None else self.args.seed
        seq = Seq(key, adapter.name if adapter else None, prompt, params, emit, cancel,
                  TextAssembler(self.decode, params.stop), torch.Generator().manual_seed(seed))
        self.count(self.waiting, key, 1)
        self.scheduler.submit(seq)

    def count(self, table: dict[str, int], key: str, by: int) -> None:
        with self._counts:
            table[key] = table.get(key, 0) + by
            if table[key] <= 0:
                del table[key]
            if by > 0 and key != self.args.served_model_name:
                self.adapter_requests_seen = True
