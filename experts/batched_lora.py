"""Per-row LoRA adapters as batched matmuls (the S-LoRA / punica idea, in plain torch).

peft's mixed-adapter forward loops over the distinct adapters of a batch in every LoRA layer
(index, two matmuls, scatter per adapter): with 8 adapters and ~70 LoRA layers that is hundreds
of tiny ops per decoding step. Here each row's A and B (scaling folded into B) are stacked once
per batch, and every LoRA layer adds ``bmm(bmm(x, A_rows), B_rows)`` to its base output: two ops
per layer whatever the number of adapters. The peft layers run with adapters disabled, so their
own LoRA path is skipped. Plain LoRA on linear layers only; anything else uses peft's path.
"""

from __future__ import annotations

from typing import Any, Sequence

from experts.chat import BASE_ADAPTER


def lora_layers(module: Any) -> list[Any]:
    """The peft LoRA layers inside ``module``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def supported(peft_model: Any, keys: Sequence[str]) -> bool:
    """True when every adapter in ``keys`` is plain LoRA on linear layers (no DoRA, no embeddings)."""
    wanted = {k for k in keys if k != BASE_ADAPTER}
    for key in wanted:
        config = peft_model.peft_config.get(key)
        if config is None or getattr(config, "use_dora", False) or getattr(config, "peft_type", None) is None \
                or str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
            return False
    for layer in lora_layers(peft_model):
        if any(key in getattr(layer, "lora_embedding_A", {}) for key in wanted):
            return False
        if any(key in layer.lora_A and getattr(layer, "lora_variant", {}).get(key) is not None for key in wanted):
            return False
    return True


class BatchedLoRA:
    """Context: run ``peft_model`` with row ``i`` using adapter ``keys[i]`` (``__base__``: none)."""

    def __init__(self, peft_model: Any, keys: Sequence[str]) -> None:
        self.peft_model = peft_model
        self.keys = list(keys)
        self._handles: list[Any] = []
        self._disabled: Any = None

    def _stacks(self, layer: Any) -> tuple[Any, Any] | None:
        """(A_rows [b, in, r], B_rows [b, r, out]) for one layer, or None when no row uses it."""
        import torch

        present = {k for k in self.keys if k in layer.lora_A}
        if not present:
            return None
        rank = max(layer.lora_A[k].weight.shape[0] for k in present)
        sample = layer.lora_A[next(iter(present))].weight
        in_dim, out_dim = sample.shape[1], layer.lora_B[next(iter(present))].weight.shape[0]
        a_rows = torch.zeros((len(self.keys), in_dim, rank), dtype=sample.dtype, device=sample.device)
        b_rows = torch.zeros((len(self.keys), rank, out_dim), dtype=sample.dtype, device=sample.device)
        for row, key in enumerate(self.keys):
            if key not in present:
                continue
            a = layer.lora_A[key].weight  # [r, in]
            b = layer.lora_B[key].weight * layer.scaling[key]  # [out, r]
            a_rows[row, :, : a.shape[0]] = a.t()
            b_rows[row, : b.shape[1], :] = b.t()
        return a_rows, b_rows

    def __enter__(self) -> "BatchedLoRA":
        import torch

        for layer in lora_layers(self.peft_model):
            stacks = self._stacks(layer)
            if stacks is None:
                continue
            a_rows, b_rows = stacks

            def add_delta(module, args, output, a_rows=a_rows, b_rows=b_rows):
                x = args[0]
                delta = torch.bmm(torch.bmm(x.to(a_rows.dtype), a_rows), b_rows)
                return output + delta.to(output.dtype)

            self._handles.append(layer.register_forward_hook(add_delta))
        self._disabled = self.peft_model.disable_adapter()
        self._disabled.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._disabled is not None:
            self._disabled.__exit__(None, None, None)
            self._disabled = None
