"""Per-row LoRA adapters as batched matmuls (the S-LoRA / punica idea, in plain torch).

peft's mixed-adapter forward loops over the distinct adapters of a batch in every LoRA layer
(index, two matmuls, scatter per adapter): with 8 adapters and ~70 LoRA layers that is hundreds
of tiny ops per decoding step. Here each row's A and B (scaling folded into B) are stacked once
per batch, and every LoRA layer adds ``bmm(bmm(x, A_rows), B_rows)`` to its base output: two ops
per layer whatever the number of adapters. The peft layers run with adapters disabled, so their
own LoRA path is skipped. Plain LoRA on linear layers only; anything else uses peft's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from experts.chat import BASE_ADAPTER


def lora_layers(module: Any) -> list[Any]:
    """The peft LoRA layers inside ``module``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def supported(peft_model: Any, keys: Sequence[str], layers: Sequence[Any] | None = None) -> bool:
    """True when every adapter in ``keys`` is plain LoRA on linear layers (no DoRA, no embeddings).
    ``layers``: the model's LoRA layers when the caller has them (saves a walk over the model)."""
    wanted = {k for k in keys if k != BASE_ADAPTER}
    for key in wanted:
        config = peft_model.peft_config.get(key)
        if (
            config is None
            or getattr(config, "use_dora", False)
            or getattr(config, "peft_type", None) is None
            or str(getattr(config.peft_type, "value", config.peft_type)) != "LORA"
        ):
            return False
    for layer in layers if layers is not None else lora_layers(peft_model):
        if any(key in getattr(layer, "lora_embedding_A", {}) for key in wanted):
            return False
        if any(key in layer.lora_A and getattr(layer, "lora_variant", {}).get(key) is not None for key in wanted):
            return False
    return True


def lora_delta(x: Any, a_t: Any, b_t: Any, token_mask: Any = None) -> Any:
    """``x @ a_t @ b_t``: one adapter's [in, r] / [r, out] or per-row [rows, in, r] / [rows, r, out]
    factors; with ``token_mask`` ([rows, tokens, 1]) applied at rank r, not at the output width."""
    low_rank = x.to(a_t.dtype) @ a_t
    if token_mask is not None:
        low_rank = low_rank * token_mask.to(low_rank.dtype)
    return low_rank @ b_t


class AdaptersOff:
    """Context: the LoRA layers compute their base layer only.

    Flips each layer's ``disable_adapters`` flag directly: peft's ``PeftModel.disable_adapter()``
    first inspects every parameter of the model, which costs ~70 ms on SmolLM2 per use, more than
    the forward pass of a short scoring batch.
    """

    def __init__(self, layers: Sequence[Any]) -> None:
        self.layers = list(layers)
        self._before: list[bool] = []

    def __enter__(self) -> AdaptersOff:
        self._before = [layer._disable_adapters for layer in self.layers]
        for layer in self.layers:
            layer._disable_adapters = True
        return self

    def __exit__(self, *exc: object) -> None:
        for layer, before in zip(self.layers, self._before):
            layer._disable_adapters = before


class BatchedLoRA:
    """Context: run ``peft_model`` with row ``i`` using adapter ``keys[i]`` (``__base__``: none).

    ``layers``: the model's LoRA layers when the caller has them (saves a walk over the model).
    ``token_mask``: [rows, tokens] 0/1, where the adapters apply (None: everywhere); every forward
    pass inside the context must then be over exactly those rows and tokens.

    When each adapter's rows are contiguous (callers can sort rows by key), each adapter's rows get
    two plain matmuls on their slice of the batch instead: no per-row copies of A and B, and no
    work for rows without an adapter. The context can be entered again (one decoding step after
    another); what it stacks is built once, from the weights as they are then (weights trained
    after that need a new context).
    """

    def __init__(
        self, peft_model: Any, keys: Sequence[str], layers: Sequence[Any] | None = None, token_mask: Any = None
    ) -> None:
        self.keys = list(keys)
        self.token_mask = None if token_mask is None else token_mask.unsqueeze(-1)
        self.layers = list(layers) if layers is not None else lora_layers(peft_model)
        self._handles: list[Any] = []
        self._hooks: list[tuple[Any, Any]] | None = None
        self._off = AdaptersOff(self.layers)

    def _stacks(self, layer: Any) -> tuple[Any, Any] | None:
        """(A_rows [b, in, r], B_rows [b, r, out]) for one layer, or None when no row uses it.

        Built once per distinct adapter (row 0: no adapter, zeros), then gathered per row."""
        import torch

        present = [k for k in dict.fromkeys(self.keys) if k in layer.lora_A]
        if not present:
            return None
        rank = max(layer.lora_A[k].weight.shape[0] for k in present)
        sample = layer.lora_A[present[0]].weight
        in_dim, out_dim = sample.shape[1], layer.lora_B[present[0]].weight.shape[0]
        a_stack = torch.zeros((len(present) + 1, in_dim, rank), dtype=sample.dtype, device=sample.device)
        b_stack = torch.zeros((len(present) + 1, rank, out_dim), dtype=sample.dtype, device=sample.device)
        for slot, key in enumerate(present, start=1):
            a = layer.lora_A[key].weight  # [r, in]
            b = layer.lora_B[key].weight * layer.scaling[key]  # [out, r]
            a_stack[slot, :, : a.shape[0]] = a.t()
            b_stack[slot, : b.shape[1], :] = b.t()
        slots = {key: slot for slot, key in enumerate(present, start=1)}
        rows = torch.tensor([slots.get(key, 0) for key in self.keys], device=sample.device)
        return a_stack[rows], b_stack[rows]

    def _segments(self) -> list[tuple[str, slice]] | None:
        """(key, its rows) when every key's rows are one contiguous run, else None."""
        runs: list[tuple[str, int, int]] = []
        for row, key in enumerate(self.keys):
            if runs and runs[-1][0] == key:
                runs[-1] = (key, runs[-1][1], row + 1)
            else:
                runs.append((key, row, row + 1))
        if len(runs) != len(set(self.keys)):
            return None
        return [(key, slice(start, end)) for key, start, end in runs if key != BASE_ADAPTER]

    def _segment_hook(self, layer: Any, segments: list[tuple[str, slice]]) -> Any:
        """A forward hook for ``layer``: each adapter's rows get x @ A.T @ (scaling * B).T on their
        slice; None when no adapter of the batch adapts this layer."""
        parts = [
            (rows, layer.lora_A[key].weight, layer.lora_B[key].weight * layer.scaling[key])
            for key, rows in segments
            if key in layer.lora_A
        ]
        if not parts:
            return None

        def add_delta(module, args, output, parts=parts, token_mask=self.token_mask):
            import torch

            x = args[0]
            if torch.is_grad_enabled():
                output = output.clone()  # autograd: no in-place change of the base layer's output
            for rows, a, b in parts:
                mask = None if token_mask is None else token_mask[rows]
                output[rows] += lora_delta(x[rows], a.t(), b.t(), mask).to(output.dtype)
            return output

        return add_delta

    def _stack_hook(self, layer: Any) -> Any:
        """A forward hook for ``layer`` adding each row's own adapter from stacked factors; None
        when no adapter of the batch adapts this layer."""
        stacks = self._stacks(layer)
        if stacks is None:
            return None
        a_rows, b_rows = stacks

        def add_delta(module, args, output, a_rows=a_rows, b_rows=b_rows, token_mask=self.token_mask):
            return output + lora_delta(args[0], a_rows, b_rows, token_mask).to(output.dtype)

        return add_delta

    def _prepared_hooks(self) -> list[tuple[Any, Any]]:
        """(layer, forward hook) pairs, built at the first entry and kept, so the engine loop can
        enter the same context at every decoding step of the same rows without restacking."""
        if self._hooks is None:
            segments = self._segments()
            hooks = [
                (layer, self._segment_hook(layer, segments) if segments is not None else self._stack_hook(layer))
                for layer in self.layers
            ]
            self._hooks = [(layer, hook) for layer, hook in hooks if hook is not None]
        return self._hooks

    def __enter__(self) -> BatchedLoRA:
        for layer, hook in self._prepared_hooks():
            self._handles.append(layer.register_forward_hook(hook))
        self._off.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._off.__exit__(None, None, None)
