"""The expert pool: one base model, many LoRA adapters, and an LRU of full-weight experts.

* LoRA experts are peft adapters added to the single base model, so each costs only its
  adapter's size. Requests for different adapters of the base (the base model itself included)
  are decoded together, one forward pass per step (peft mixed-adapter batches).
* Full-weight experts live in an LRU bounded by a memory budget; evicting one frees its memory.
* ``score`` returns per-expert answer likelihoods (with and without the question: PMI).
* One engine loop (:mod:`experts.engine`) owns the models: generation, streaming and scoring all
  run on its thread; a request joins the running batch at the next decoding step and leaves it
  when done, so nobody waits for someone else's whole generation.

The public interface is small and free of Ray so a Ray Serve deployment can wrap it unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from experts import batched_lora
from experts.base_models import SMOLLM2_ID, ensure_base_model
from experts.chat import (
    BASE_ADAPTER,
    EncodedPair,
    answer_logprobs,
    answer_token_logprob_rows,
    encode_pair,
    prompt_ids,
    template_prefix,
    unconditional_prefix,
)
from experts.engine import Admission, EngineLoop, RowHandle
from experts.loader import full_model_from_verified, lora_from_verified, read_verified, tokenizer_from_verified
from experts.policy import DevicePolicy
from experts.shared_trunk import TrunkScorer, answer_positions
from experts.types import BASE_EXPERT, ExpertScore, GenerationRequest, GenerationResult, SamplingParams, validate
from registry.errors import ArtifactError, MoseError, NotFoundError
from registry.home import MoseHome

_SCORE_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}
"""Default padded tokens per scoring pass: on an H100, 8x the CPU's budget scored 512 items of
jury evidence 3-5x faster (docs/benchmarks.md, GPU); on this CPU 8192 was slower than 4096."""


_DECODE_CONTEXTS = 8
"""Decoding contexts (stacked LoRA factors per row set) kept: the running batch's, and the prefill
passes' of newcomers, change only when rows join or leave."""


class PoolConfig(BaseModel):
    """Limits and placement of one expert pool."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(default=SMOLLM2_ID, description="Base model id that LoRA experts attach to.")
    max_new_tokens_limit: int = Field(default=512, ge=1, description="Upper bound on max_new_tokens.")
    max_prompt_tokens: int = Field(default=1024, ge=8, description="Longer prompts are cut from the left.")
    max_batch_size: int = Field(
        default=16,
        ge=1,
        description="Most rows decoded together per model; more "
        "wait for a free slot (a row leaves the batch as soon as it is done).",
    )
    batch_wait_s: float = Field(
        default=0.0,
        ge=0,
        description="How long an idle pool waits after a first "
        "request for others to share its prefill pass; requests that arrive while a "
        "batch runs join it at the next step without waiting.",
    )
    score_max_tokens: int = Field(default=256, ge=8, description="Token budget of one scored question+answer.")
    score_batch_tokens: int | None = Field(
        default=None,
        ge=64,
        description="Padded tokens per scoring forward "
        "pass (rows of several items are length-sorted and packed up to "
        "this). None: 4096 on CPU, 32768 on CUDA (measured best on each).",
    )
    full_expert_budget_bytes: int = Field(
        default=2 << 30, ge=0, description="Memory budget of the full-weight expert LRU."
    )
    load_base: bool = Field(
        default=True,
        description="Load the base model's weights. False: a pool of "
        "full-weight experts only (the base's tokenizer is still loaded, for experts "
        "that ship none); it serves no LoRA experts and no 'base'.",
    )
    batched_lora: bool = Field(
        default=True,
        description="Decode mixed-adapter batches with stacked per-row "
        "LoRA matmuls (experts.batched_lora) instead of peft's per-adapter loop.",
    )
    shared_trunk: bool = Field(
        default=True,
        description="Score a text under several LoRA experts with the "
        "layers none of them adapts run once (experts.shared_trunk); False: one "
        "full forward pass per expert.",
    )
    policy: DevicePolicy = Field(default_factory=DevicePolicy, description="Device and precision policy.")


@dataclass
class _FullEntry:
    model: Any
    tokenizer: Any
    nbytes: int


def model_bytes(model: Any) -> int:
    """Bytes held by a model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class FullExpertLRU:
    """Full-weight experts in memory, least recently used evicted first, within a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _FullEntry] = OrderedDict()

    @property
    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def names(self) -> list[str]:
        """Loaded experts, least recently used first."""
        return list(self._entries)

    def peek(self, name: str) -> _FullEntry | None:
        """The entry without counting it as a use."""
        return self._entries.get(name)

    def get(self, name: str) -> _FullEntry | None:
        entry = self._entries.get(name)
        if entry is not None:
            self._entries.move_to_end(name)
        return entry

    def make_room(self, nbytes: int) -> list[str]:
        """Evict least recently used experts until ``nbytes`` more fit; return the evicted names."""
        if nbytes > self.budget_bytes:
            raise MoseError(
                f"a full expert of {nbytes >> 20} MiB does not fit the full-expert memory budget "
                f"({self.budget_bytes >> 20} MiB): raise PoolConfig.full_expert_budget_bytes"
            )
        evicted = []
        while self._entries and self.used_bytes + nbytes > self.budget_bytes:
            name, _ = self._entries.popitem(last=False)
            evicted.append(name)
        if evicted:
            gc.collect()  # drop the evicted tensors now, not at some later collection
        return evicted

    def put(self, name: str, entry: _FullEntry) -> None:
        self.make_room(entry.nbytes)
        self._entries[name] = entry

    def discard(self, name: str) -> None:
        if self._entries.pop(name, None) is not None:
            gc.collect()


class ExpertPool:
    """One base model plus LoRA adapters, and full-weight experts in an LRU."""

    def __init__(self, config: PoolConfig | None = None, home: MoseHome | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config or PoolConfig()
        self._home = home or MoseHome.from_env()
        self._lock = threading.RLock()
        base_dir = ensure_base_model(self.config.base_model, self._home)
        plan = self.config.policy.base_plan()
        self.device = plan.device
        self.dtype = str(plan.dtype).removeprefix("torch.")  # the base model's precision ("float32", ...)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
        self._base: Any = None
        if self.config.load_base:
            base = AutoModelForCausalLM.from_pretrained(base_dir, **plan.from_pretrained_kwargs())
            if plan.quantization_config is None:
                base = base.to(plan.device)
            self._base = base.eval()
        self._peft: Any = None  # PeftModel once the first adapter is added
        self._trunk: TrunkScorer | None = None  # scoring state of the current adapter set
        self._contexts: OrderedDict[tuple, tuple[Any, list[str] | None]] = OrderedDict()  # decoding contexts
        self._adapters: dict[str, str] = {}  # expert name -> peft adapter key
        self._adapter_bytes: dict[str, int] = {}
        self._full_sources: dict[str, tuple[Any, Any]] = {}  # expert name -> (registry, record)
        self._full = FullExpertLRU(self.config.full_expert_budget_bytes)
        self._next_key = 0
        self.rejected: dict[str, str] = {}  # expert name -> why loading it failed
        self.engine = EngineLoop(self, self.config.max_batch_size, self.config.batch_wait_s)

    # ------------------------------------------------------------ loading experts

    @classmethod
    def from_registry(cls, registry: Any, config: PoolConfig | None = None, home: MoseHome | None = None) -> ExpertPool:
        """A pool holding every active expert of ``registry`` that it can serve."""
        pool = cls(config, home)
        pool.load_registry(registry)
        return pool

    def load_registry(self, registry: Any) -> list[str]:
        """Add the active experts of ``registry`` (LoRA on this pool's base, and full experts).

        Experts whose files fail verification are skipped (the loader quarantined them); their
        errors are kept in :attr:`rejected`. Returns the names added.
        """
        added = []
        for record in registry.list(status="active"):
            if record.kind == "lora" and record.base_model != self.config.base_model:
                continue  # served by a pool on another base
            try:
                self.add_registered(registry, record)
            except ArtifactError as exc:
                # One bad expert (already quarantined by the loader) must not stop the others.
                self.rejected[record.name] = str(exc)
                continue
            added.append(record.name)
        return added

    def add_registered(self, registry: Any, record: Any, load_now: bool = False) -> None:
        """Add one registered expert; its files are verified (tampering quarantines it).

        A full-weight expert's weights are loaded at its first request, or here with ``load_now``
        (from the files just verified, so they are read once)."""
        if record.kind == "full":
            verified = read_verified(registry, record)  # fail now, not on the first request
            with self._lock:
                self._full_sources[record.name] = (registry, record)
                if load_now:
                    self._load_full(record, verified)
            return
        self._require_base(record.name)
        if record.base_model != self.config.base_model:
            raise MoseError(
                f"{record.name}: adapter for base model {record.base_model!r}, but this pool "
                f"serves {self.config.base_model!r}"
            )
        lora_config, state = lora_from_verified(read_verified(registry, record))
        self.add_adapter(record.name, lora_config, state)

    def add_adapter(self, name: str, lora_config: Any, state_dict: dict) -> None:
        """Add a LoRA expert from an already-verified config and state dict (replaces ``name``)."""
        from peft import get_peft_model, set_peft_model_state_dict

        self._check_name(name)
        self._require_base(name)
        with self._lock:
            if name in self._adapters:
                self.remove(name)
            lora_config = copy.deepcopy(lora_config)  # peft rewrites fields of the config it is given
            key = f"expert{self._next_key}"
            self._next_key += 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft notes it rewrote base_model_name_or_path: expected
                # low_cpu_mem_usage: create the adapter's tensors empty (no random init), the
                # verified state dict below fills them; several times faster per adapter.
                if self._peft is None:
                    self._peft = get_peft_model(self._base, lora_config, adapter_name=key, low_cpu_mem_usage=True)
                else:
                    self._peft.add_adapter(key, lora_config, low_cpu_mem_usage=True)
            result = set_peft_model_state_dict(self._peft, state_dict, adapter_name=key, low_cpu_mem_usage=True)
            missing = [k for k in getattr(result, "missing_keys", []) if f".{key}." in k and "lora_" in k]
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if unexpected or missing:
                self._drop_adapter(key)
                raise MoseError(
                    f"{name}: adapter weights do not fit its adapter_config.json / the base model "
                    f"(unexpected {unexpected[:3]}, missing {missing[:3]})"
                )
            self._peft.eval()
            self._trunk = None
            self._contexts.clear()
            self._adapters[name] = key
            self._adapter_bytes[name] = sum(t.numel() * t.element_size() for t in state_dict.values())

    def remove(self, name: str) -> None:
        """Unload an expert (adapter or full)."""
        with self._lock:
            if name in self._adapters:
                self._adapter_bytes.pop(name, None)
                self._drop_adapter(self._adapters.pop(name))
            elif name in self._full_sources:
                self._full_sources.pop(name)
                self._full.discard(name)
            else:
                raise self._unknown(name)

    def _drop_adapter(self, key: str) -> None:
        self._trunk = None
        self._contexts.clear()
        if len(self._peft.peft_config) == 1:
            # peft cannot run with zero adapters: go back to the plain base model.
            self._base = self._peft.unload()
            self._peft = None
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "active adapter deleted": we always pass adapter_names
            self._peft.delete_adapter(key)

    def _require_base(self, name: str) -> None:
        if self._shared_model() is None:
            raise MoseError(
                f"{name}: this pool holds full-weight experts only (PoolConfig.load_base=False); "
                "LoRA experts need a pool with the base model loaded"
            )

    def _check_name(self, name: str) -> None:
        if name in (BASE_EXPERT, self.config.base_model):
            raise MoseError(f"{name!r} names the base model; choose another expert name")

    # ------------------------------------------------------------ introspection

    def experts(self) -> dict[str, str]:
        """Expert name -> kind ('base', 'lora', 'full') of everything this pool can serve."""
        names = {BASE_EXPERT: "base"} if self._shared_model() is not None else {}
        names.update({n: "lora" for n in self._adapters})
        names.update({n: "full" for n in self._full_sources})
        return names

    def close(self) -> None:
        """Stop the engine loop (requests still waiting or running fail); the pool serves no more."""
        self.engine.close()

    def memory(self) -> dict[str, Any]:
        """Bytes held by the base model, the adapters and the full-expert LRU."""
        return {
            "base_bytes": model_bytes(self._shared_model()) - sum(self._adapter_bytes.values())
            if self._shared_model() is not None
            else 0,
            "adapter_bytes": sum(self._adapter_bytes.values()),
            "adapters": len(self._adapters),
            "full_loaded": self._full.names(),
            "full_bytes": self._full.used_bytes,
            "full_budget_bytes": self._full.budget_bytes,
        }

    # ------------------------------------------------------------ routing requests to models

    def _unknown(self, name: str) -> NotFoundError:
        known = ", ".join(sorted(self.experts()))
        return NotFoundError(f"unknown expert {name!r}: this pool serves {known}")

    def _resolve(self, name: str) -> tuple[str, str]:
        """('shared', adapter key or __base__) or ('full', name)."""
        if name in (BASE_EXPERT, self.config.base_model) and self._shared_model() is not None:
            return "shared", BASE_ADAPTER
        if name in self._adapters:
            return "shared", self._adapters[name]
        if name in self._full_sources:
            return "full", name
        raise self._unknown(name)

    def _shared_model(self) -> Any:
        return self._peft if self._peft is not None else self._base

    def _trunk_scorer(self, keys: Sequence[str]) -> TrunkScorer | None:
        """The shared-trunk scorer of the loaded adapters when it can score ``keys`` (built once
        per adapter set: add_adapter and _drop_adapter reset it)."""
        if not self.config.shared_trunk or self._peft is None:
            return None
        if self._trunk is None:
            prefixes = [template_prefix(self.tokenizer), unconditional_prefix(self.tokenizer)]
            self._trunk = TrunkScorer(self._peft, prefixes)
        return self._trunk if self._trunk.supports(keys) else None

    def _adapter_names(self, keys: Sequence[str]) -> list[str] | None:
        # Without adapters the plain base model runs; with them every row must name its adapter,
        # otherwise peft would apply the active adapter to base-model rows.
        return list(keys) if self._peft is not None else None

    def _adapter_context(
        self, adapters: list[str] | None, answers_only: Sequence[EncodedPair] | None = None
    ) -> tuple[Any, list[str] | None]:
        """(context, adapter_names): stacked per-row LoRA matmuls when every adapter allows it,
        else peft's own per-adapter loop through ``adapter_names``.

        ``answers_only``: the scored rows, whose adapters then apply only where an answer token is
        predicted (``adapt_question=False`` in :meth:`score`; needs the stacked matmuls)."""
        import torch

        stackable = adapters is not None and batched_lora.supported(self._peft, adapters)
        if stackable and answers_only is not None:
            width = max(len(pair.input_ids) for pair in answers_only)
            lengths = torch.tensor([pair.answer_len + 1 for pair in answers_only])  # + the unscored last column
            device = next(self._peft.parameters()).device
            return batched_lora.BatchedLoRA(
                self._peft, adapters, token_mask=answer_positions(lengths.to(device), width)
            ), None
        if adapters is not None and answers_only is not None:
            warnings.warn(
                f"adapters {sorted(set(adapters) - {BASE_ADAPTER})} are not plain LoRA and cannot be "
                "limited to the answer tokens: they read the question too",
                stacklevel=2,
            )
        if stackable and self.config.batched_lora:
            return batched_lora.BatchedLoRA(self._peft, adapters), None
        return contextlib.nullcontext(), adapters

    def _full_model(self, name: str) -> _FullEntry:
        entry = self._full.get(name)
        if entry is not None:
            return entry
        registry, record = self._full_sources[name]
        return self._load_full(record, read_verified(registry, record))

    def _load_full(self, record: Any, verified: Any) -> _FullEntry:
        """Build a full expert from its verified files into the LRU (evicting to make room)."""
        size = sum(len(b) for p, b in verified.files.items() if p.endswith(".safetensors"))
        self._full.make_room(size)
        plan = self.config.policy.plan(record.manifest.quantization)
        model = full_model_from_verified(verified, plan)
        tokenizer = tokenizer_from_verified(verified) or self.tokenizer
        entry = _FullEntry(model=model, tokenizer=tokenizer, nbytes=model_bytes(model))
        self._full.put(record.name, entry)
        return entry

    def _groups(self, names: Sequence[str]) -> list[tuple[str, list[int]]]:
        """Row indices grouped by model: all shared-base rows together, one group per full expert."""
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            kind, target = self._resolve(name)
            groups.setdefault("" if kind == "shared" else target, []).append(i)
        return list(groups.items())

    def _model_for(self, group: str) -> tuple[Any, Any]:
        if group == "":
            return self._shared_model(), self.tokenizer
        entry = self._full_model(group)
        return entry.model, entry.tokenizer

    # ------------------------------------------------------------ generation

    def _check_request(self, request: Any) -> GenerationRequest:
        request = validate(GenerationRequest, request, "generation request")
        limit = self.config.max_new_tokens_limit
        if request.params.max_new_tokens > limit:
            raise MoseError(
                f"invalid generation request: max_new_tokens={request.params.max_new_tokens} is above "
                f"this pool's limit of {limit}"
            )
        self._resolve(request.expert)
        return request

    def _prompt(self, tokenizer: Any, request: GenerationRequest) -> list[int]:
        if request.prompt is None:
            ids = prompt_ids(tokenizer, [m.model_dump() for m in request.messages])
            return ids[-self.config.max_prompt_tokens :]
        if isinstance(request.prompt, str):
            ids = tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = list(request.prompt)
            if any(not 0 <= token < len(tokenizer) for token in ids):
                raise MoseError(f"invalid generation request: prompt token ids must be in [0, {len(tokenizer)})")
        if not ids:
            raise MoseError("invalid generation request: the prompt is empty")
        if len(ids) > self.config.max_prompt_tokens:  # not cut: its tokens may be scored
            raise MoseError(
                f"invalid generation request: the prompt is {len(ids)} tokens; this pool takes at "
                f"most {self.config.max_prompt_tokens}"
            )
        return ids

    def submit(self, request: Any, stream: bool = False) -> RowHandle:
        """Queue one request on the engine loop and return its handle at once; it joins the running
        batch at the next step. ``stream``: its text pieces go to the handle as they are decoded.
        An invalid request or an unknown expert raises here."""
        return self.engine.submit(self._check_request(request), stream)

    def generate(self, requests: Iterable[Any]) -> list[GenerationResult]:
        """Complete every request; requests on the shared base decode in the same mixed-adapter steps
        (with whatever else the pool is decoding)."""
        requests = [self._check_request(r) for r in requests]  # all checked before any is queued
        handles = [self.engine.submit(r) for r in requests]
        try:
            return [handle.result() for handle in handles]
        finally:
            for handle in handles:
                handle.cancel()  # nothing left to stop unless one of them failed

    def stream(self, request: Any) -> RowHandle:
        """The completion of one request as text pieces, as they are generated: iterate the handle
        (``for`` or ``async for``); its ``result()`` then has the finish reason. Leaving the
        iteration early (or ``cancel()``) stops the decoding within a step."""
        return self.submit(request, stream=True)

    # ------------------------------------------------------------ the engine loop's view (experts.engine.EngineHost)

    def _admit(self, request: GenerationRequest) -> Admission:
        kind, key = self._resolve(request.expert)
        group = "" if kind == "shared" else key
        model, tokenizer = self._model_for(group)
        eos = {tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return Admission(
            group=group,
            key=key,
            prompt=self._prompt(tokenizer, request),
            model=model if group else None,
            tokenizer=tokenizer,
            eos_ids=frozenset(e for e in eos if e is not None),
            pad_id=pad,
        )

    def _forward_setup(self, group: str, held_model: Any, keys: Sequence[str]) -> tuple[Any, Any, list[str] | None]:
        if group:
            return held_model, contextlib.nullcontext(), None
        return self._shared_model(), *self._decode_context(keys)

    def _decode_context(self, keys: Sequence[str]) -> tuple[Any, list[str] | None]:
        """:meth:`_adapter_context` for decoding rows with these keys, kept while the adapter set is
        unchanged: the same rows step after step reuse their stacked LoRA factors."""
        cache_key = (tuple(keys), self.config.batched_lora)
        found = self._contexts.get(cache_key)
        if found is None:
            found = self._contexts[cache_key] = self._adapter_context(self._adapter_names(keys))
            while len(self._contexts) > _DECODE_CONTEXTS:
                self._contexts.popitem(last=False)
        self._contexts.move_to_end(cache_key)
        return found

    def _serves(self, admission: Admission) -> bool:
        if admission.group or admission.key == BASE_ADAPTER:
            return True  # a full expert's batch holds its model; the base model is always there
        return self._peft is not None and admission.key in self._peft.peft_config

    # ------------------------------------------------------------ scoring

    def answer_loss(
        self, pairs: Sequence[tuple[str, str]], experts: Sequence[str], max_tokens: int = 96, batch_size: int = 8
    ) -> dict[str, float]:
        """Held-out answer loss (token-weighted mean NLL) of each shared-base expert on the same pairs."""
        rows = self.answer_nll_rows(pairs, experts, max_tokens, batch_size)
        return {name: sum(n for n, _ in per_row) / max(1, sum(c for _, c in per_row)) for name, per_row in rows.items()}

    def answer_nll_rows(
        self, pairs: Sequence[tuple[str, str]], experts: Sequence[str], max_tokens: int = 96, batch_size: int = 8
    ) -> dict[str, list[tuple[float, int]]]:
        """Per shared-base expert, per pair: (summed answer-token NLL, answer tokens), every
        (pair, expert) row in mixed-adapter batches (teacher-forced, truncated to ``max_tokens``).
        Runs on the engine loop's thread, between decoding steps."""
        rows = self.answer_token_logprobs(pairs, experts, max_tokens, batch_size)
        return {name: [(-sum(tokens), len(tokens)) for tokens in per_pair] for name, per_pair in rows.items()}

    def answer_token_logprobs(
        self, pairs: Sequence[tuple[str, str]], experts: Sequence[str], max_tokens: int = 96, batch_size: int = 8
    ) -> dict[str, list[list[float]]]:
        """Per shared-base expert, per pair: the log-prob of each answer token, teacher-forced
        (truncated to ``max_tokens``), in mixed-adapter batches on the engine loop's thread."""
        return self.engine.call(self._answer_token_logprobs, pairs, experts, max_tokens, batch_size)

    def _answer_token_logprobs(
        self, pairs: Sequence[tuple[str, str]], experts: Sequence[str], max_tokens: int, batch_size: int
    ) -> dict[str, list[list[float]]]:
        import torch

        keys = {}
        for name in experts:
            kind, key = self._resolve(name)
            if kind != "shared":
                raise MoseError(f"answer losses compare experts on the shared base; {name!r} is a full expert")
            keys[name] = key
        encoded = [encode_pair(self.tokenizer, q, a, max_tokens) for q, a in pairs]
        # one adapter per batch where possible (peft runs each adapter of a mixed batch apart), short rows together
        jobs = sorted(
            ((name, i) for name in keys for i in range(len(encoded))),
            key=lambda job: (keys[job[0]], len(encoded[job[1]].input_ids)),
        )
        out: dict[str, list[list[float]]] = {name: [[] for _ in encoded] for name in keys}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            model = self._shared_model()
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start : start + batch_size]
                names = self._adapter_names([keys[name] for name, _ in chunk])
                rows = answer_token_logprob_rows(model, [encoded[i] for _, i in chunk], pad, names)
                for (name, i), tokens in zip(chunk, rows):
                    out[name][i] = tokens
        return out

    def score(
        self,
        question: str,
        answer: str,
        experts: Sequence[str],
        adapt_question: bool = True,
        state_layer: int | None = None,
    ) -> list[ExpertScore]:
        """Per expert: mean log-prob of the answer tokens with and without the question, and PMI.

        ``adapt_question=False``: a LoRA expert's adapter applies only where an answer token is
        predicted; the question is read by the base model, once for all experts (faster on short
        answers; the scores differ, so evidence collected one way is not comparable to the other).
        ``state_layer``: the base model's score also carries its ``answer_state`` at that layer
        (no layer runs for it when the layer is in the shared trunk).
        """
        return self.score_many([(question, answer, experts)], adapt_question, state_layer)[0]

    def score_many(
        self,
        items: Sequence[tuple[str, str, Sequence[str]]],
        adapt_question: bool = True,
        state_layer: int | None = None,
    ) -> list[list[ExpertScore]]:
        """:meth:`score` for several (question, answer, experts) items at once.

        Every (item, with/without question) text of a model is length-sorted and packed into
        forward passes of about ``score_batch_tokens`` padded tokens, one row per (text, expert)
        with its own adapter, so short answers from many items share passes instead of padding
        each other; the layers no expert of a pass adapts run once per text (``shared_trunk``).
        The whole call is one job of the engine loop, run between decoding steps, so it sees one
        set of loaded experts.
        """
        return self.engine.call(self._score_many, items, adapt_question, state_layer)

    def _score_many(
        self, items: Sequence[tuple[str, str, Sequence[str]]], adapt_question: bool, state_layer: int | None
    ) -> list[list[ExpertScore]]:
        items = [(q, a, list(e) or [BASE_EXPERT]) for q, a, e in items]
        depth = self._base.config.num_hidden_layers if self._base is not None else None
        if state_layer is not None and depth is not None and not 0 <= state_layer <= depth:
            raise MoseError(f"state_layer {state_layer} is outside the base model's layers (0-{depth})")
        for _, answer, experts in items:
            if not answer:
                raise MoseError("cannot score an empty answer")
            for name in experts:
                self._resolve(name)
        means: dict[tuple[int, int, bool], float] = {}
        states: dict[tuple[int, int], list[float]] = {}
        answer_lens: dict[int, int] = {}
        for group, texts in self._score_texts(items).items():
            model, tokenizer = self._model_for(group)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            layer = state_layer if group == "" else None  # the base model lives in the shared group
            for batch in self._score_batches(texts):
                results = self._score_batch(group, model, pad, batch, adapt_question, layer)
                for ((i, with_q), pair, jurors), result in zip(batch, results):
                    for (j, _), (total, count, state) in zip(jurors, result):
                        means[(i, j, with_q)] = total / count
                        if with_q and state is not None:
                            states[(i, j)] = state.tolist()
                    if with_q:
                        answer_lens[i] = pair.answer_len
        return [
            [
                ExpertScore(
                    expert=name,
                    logp_given_question=means[(i, j, True)],
                    logp_without_question=means[(i, j, False)],
                    pmi=means[(i, j, True)] - means[(i, j, False)],
                    answer_tokens=answer_lens[i],
                    answer_state=states.get((i, j)) if name == BASE_EXPERT else None,
                )
                for j, name in enumerate(experts)
            ]
            for i, (_, _, experts) in enumerate(items)
        ]

    def answer_states(self, items: Sequence[tuple[str, str]], layer: int) -> list[Any]:
        """The base model's answer state at ``layer`` for each (question, answer): what
        :meth:`score` gives the base model's score with ``state_layer``, without the jurors, the
        unconditional text, the layers above ``layer`` or the LM head (with the shared trunk; a
        base-model :meth:`score_many` otherwise). Texts are packed by length into passes of the
        scoring budget, on the engine loop's thread."""
        return self.engine.call(self._answer_states, items, layer)

    def _answer_states(self, items: Sequence[tuple[str, str]], layer: int) -> list[Any]:
        import torch

        depth = self._base.config.num_hidden_layers if self._base is not None else None
        if depth is not None and not 0 <= layer <= depth:
            raise MoseError(f"state layer {layer} is outside the base model's layers (0-{depth})")
        scorer = self._trunk_scorer([BASE_ADAPTER])
        if scorer is None:
            scores = self._score_many([(q, a, [BASE_EXPERT]) for q, a in items], True, layer)
            return [torch.tensor(base.answer_state) for (base,) in scores]
        pairs = [encode_pair(self.tokenizer, q, a, self.config.score_max_tokens) for q, a in items]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        budget = self.config.score_batch_tokens or _SCORE_BATCH_TOKENS.get(self.device, _SCORE_BATCH_TOKENS["cpu"])
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids))
        states: list[Any] = [None] * len(pairs)
        start = 0
        with torch.inference_mode():
            while start < len(order):  # longest last: a pass holds as many rows as fit its widest
                end = start + 1
                while end < len(order) and (end - start + 1) * len(pairs[order[end]].input_ids) <= budget:
                    end += 1
                batch = order[start:end]
                for i, state in zip(batch, scorer.answer_states([pairs[i] for i in batch], pad, layer)):
                    states[i] = state
                start = end
        return states

    def _score_texts(self, items: Sequence[tuple[str, str, list[str]]]) -> dict[str, list[tuple]]:
        """Model group -> texts ((item, with question?), encoded pair, [(expert index, adapter key)]).

        Each item gives two texts per model (with and without the question), each scored by all
        of the item's experts on that model.
        """
        texts: dict[str, list[tuple]] = {}
        for i, (question, answer, experts) in enumerate(items):
            for group, indices in self._groups(experts):
                tokenizer = self._model_for(group)[1]
                jurors = [(j, self._resolve(experts[j])[1]) for j in indices]
                for with_q in (True, False):
                    pair = encode_pair(tokenizer, question if with_q else None, answer, self.config.score_max_tokens)
                    texts.setdefault(group, []).append(((i, with_q), pair, jurors))
        return texts

    def _score_batches(self, texts: list[tuple]) -> Iterator[list[tuple]]:
        """Length-sorted texts packed so that scored rows (texts x experts) x longest text stays
        within the token budget, and padding stays under a quarter of the batch. Texts without
        their question come first: packed together, they share their whole prompt, which the
        shared trunk caches."""
        texts = sorted(texts, key=lambda text: (text[0][1], len(text[1].input_ids)))
        budget = self.config.score_batch_tokens or _SCORE_BATCH_TOKENS.get(self.device, _SCORE_BATCH_TOKENS["cpu"])
        batch: list[tuple] = []
        rows = tokens = widest = 0
        for text in texts:
            width, fan_out = len(text[1].input_ids), len(text[2])
            # sorted by length within each kind: the first texts with their question can be
            # shorter than the last ones without
            padded = (rows + fan_out) * max(widest, width)
            if batch and (padded > budget or padded > 1.25 * (tokens + fan_out * width)):
                yield batch
                batch, rows, tokens, widest = [], 0, 0, 0
            batch.append(text)
            rows, tokens, widest = rows + fan_out, tokens + fan_out * width, max(widest, width)
        if batch:
            yield batch

    def _score_batch(
        self, group: str, model: Any, pad: int, batch: list[tuple], adapt_question: bool, state_layer: int | None = None
    ) -> list[list[tuple[float, int, Any]]]:
        """Per text of ``batch``, per expert: (sum of answer-token log-probs, answer-token count,
        the base model's answer state at ``state_layer`` or None)."""
        import torch

        pairs = [pair for _, pair, _ in batch]
        keys = [[key for _, key in jurors] for _, _, jurors in batch]
        flat_keys = [key for row in keys for key in row]
        with torch.inference_mode():
            scorer = self._trunk_scorer(flat_keys) if group == "" else None
            if scorer is not None:
                return scorer.score(pairs, keys, pad, adapt_question, state_layer)
            rows = [pair for pair, row in zip(pairs, keys) for _ in row]
            adapters = self._adapter_names(flat_keys) if group == "" else None
            context, adapters = self._adapter_context(adapters, None if adapt_question else rows)
            with context:
                sums, counts, *states = answer_logprobs(model, rows, pad, adapters, state_layer)
        row_states = states[0] if states else [None] * len(rows)
        flat = iter(zip(sums.tolist(), counts.tolist(), row_states, flat_keys))
        return [
            [
                (total, count, state if key == BASE_ADAPTER else None)
                for total, count, state, key in (next(flat) for _ in row)
            ]
            for row in keys
        ]


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


__all__ = ["ExpertPool", "PoolConfig", "FullExpertLRU", "SamplingParams", "GenerationRequest"]
