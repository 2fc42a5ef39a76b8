"""Load expert files safely: only from the registry's artifact store, only verified bytes.

Every file is read once into memory, hashed, compared with the manifest's sha256, and then
parsed from those same bytes (no time-of-check/time-of-use gap): safetensors with
``safetensors.torch.load(bytes)``, JSON with ``json.loads``. A file that changed after
registration fails the load with :class:`ArtifactError` and moves the expert to
``quarantined`` (the registry audit-logs it). Pickles and configs asking for remote code are
refused here too, even though the registry refuses them at registration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import PurePosixPath
from typing import Any

from registry.errors import ArtifactError, StoredArtifactError
from registry.safety import find_remote_code_key

LOADER_ACTOR = "expert-loader"
SAFETENSORS = ".safetensors"
ALLOWED_SUFFIXES = frozenset({SAFETENSORS, ".json", ".txt", ".jinja"})
LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class VerifiedFiles:
    """An expert's files as bytes whose sha256 matched the manifest."""

    ref: str
    files: dict[str, bytes]

    def json(self, relpath: str) -> Any:
        return json.loads(self.files[relpath])

    def tensors(self, relpath: str) -> dict:
        from safetensors.torch import load

        try:
            return load(self.files[relpath])
        except Exception as exc:  # safetensors raises its own error types
            raise ArtifactError(f"{self.ref}: {relpath} is not a valid safetensors file ({exc})") from None


def _refuse_unsafe(ref: str, relpath: str, data: bytes) -> None:
    """Only safetensors and small text/JSON files; nothing that runs code when loaded."""
    suffix = PurePosixPath(relpath).suffix.lower()
    if suffix not in ALLOWED_SUFFIXES:
        raise ArtifactError(
            f"{ref}: {relpath} has file type {suffix or '(none)'}; the loader only "
            f"reads {', '.join(sorted(ALLOWED_SUFFIXES))} files (no pickles, no code)"
        )
    # A safetensors file starts with its header length, which may look like a pickle opcode:
    # those are checked by parsing them with safetensors instead.
    if suffix != SAFETENSORS and (data[:1] == b"\x80" or data[:4] == b"PK\x03\x04"):
        raise ArtifactError(f"{ref}: {relpath} holds a pickle/zip archive; only safetensors weights load")
    if suffix == ".json":
        try:
            parsed = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{ref}: {relpath} is not valid JSON ({exc})") from None
        key = find_remote_code_key(parsed)
        if key:
            raise ArtifactError(
                f"{ref}: {relpath} sets {key!r} (remote code); the loader never runs "
                "code shipped with a model: re-register without it"
            )


def read_verified(registry: Any, record: Any, actor: str = LOADER_ACTOR) -> VerifiedFiles:
    """Read every file of ``record`` from the artifact store and check it against the manifest.

    A missing or changed file quarantines the expert (audit-logged) and raises ArtifactError.
    """
    manifest = record.manifest
    ref = f"{record.name}@{record.version}"
    blobs = registry.blob_paths(record)
    files: dict[str, bytes] = {}
    for relpath, want in sorted(manifest.files.items()):
        path = blobs.get(relpath)
        try:
            data = path.read_bytes() if path is not None else None
        except OSError:
            data = None
        if data is None:
            _quarantine(registry, record, actor, f"{relpath} is missing from the artifact store")
            raise StoredArtifactError(
                f"{ref}: {relpath} is missing from the artifact store; the expert was quarantined: register it again"
            )
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            _quarantine(registry, record, actor, f"{relpath}: sha256 {got} != manifest {want}")
            raise StoredArtifactError(
                f"{ref}: {relpath} does not match its registered sha256 (file changed after "
                "registration: expected "
                f"{want[:12]}..., found {got[:12]}...); the expert was "
                "quarantined: register a new version with the correct files"
            )
        _refuse_unsafe(ref, relpath, data)
        files[relpath] = data
    return VerifiedFiles(ref=ref, files=files)


def _quarantine(registry: Any, record: Any, actor: str, reason: str) -> None:
    if getattr(record, "status", None) == "quarantined":
        return
    registry.quarantine(record.name, record.version, reason=f"load check failed: {reason}", actor=actor)


# ---------------------------------------------------------------- LoRA adapters


def lora_config_from_dict(ref: str, data: dict) -> Any:
    """A peft LoraConfig from adapter_config.json data (unknown keys dropped; never loads the base)."""
    from peft import LoraConfig

    peft_type = str(data.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ArtifactError(f"{ref}: {LORA_CONFIG} has peft_type {peft_type!r}; only LoRA adapters are supported")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    kwargs = {
        k: v
        for k, v in data.items()
        if k in known and k not in ("peft_type", "base_model_name_or_path", "revision", "auto_mapping")
    }
    kwargs["inference_mode"] = True
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{ref}: {LORA_CONFIG} is not a valid LoRA config ({exc})") from None


def lora_from_verified(verified: VerifiedFiles) -> tuple[Any, dict]:
    """(LoraConfig, adapter state dict) from verified files."""
    for needed in (LORA_CONFIG, LORA_WEIGHTS):
        if needed not in verified.files:
            raise ArtifactError(f"{verified.ref}: a lora expert needs {needed} (peft format)")
    return lora_config_from_dict(verified.ref, verified.json(LORA_CONFIG)), verified.tensors(LORA_WEIGHTS)


def load_lora(registry: Any, record: Any) -> tuple[Any, dict]:
    """Verified (LoraConfig, state dict) of a registered LoRA expert."""
    return lora_from_verified(read_verified(registry, record))


# ---------------------------------------------------------------- full-weight experts


def full_model_from_verified(verified: VerifiedFiles, plan: Any) -> Any:
    """Build a full-weight causal LM from verified config.json + safetensors bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if "config.json" not in verified.files:
        raise ArtifactError(f"{verified.ref}: a full expert needs config.json")
    config_data = dict(verified.json("config.json"))
    model_type = config_data.pop("model_type", None)
    if not model_type:
        raise ArtifactError(f"{verified.ref}: config.json has no model_type")
    config = AutoConfig.for_model(model_type, **config_data)
    state: dict = {}
    for relpath in sorted(p for p in verified.files if p.endswith(SAFETENSORS)):
        state.update(verified.tensors(relpath))
    if not state:
        raise ArtifactError(f"{verified.ref}: a full expert needs safetensors weights")
    if plan.quantization_config is not None:
        return _quantized_from_state(verified, config, state, plan)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ArtifactError(
            f"{verified.ref}: weights do not fit config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model.to(device=plan.device, dtype=plan.dtype).eval()


def _quantized_from_state(verified: VerifiedFiles, config: Any, state: dict, plan: Any) -> Any:
    """bitsandbytes quantises inside from_pretrained: give it a private folder holding the
    already-verified tensors (re-serialised by us, so nothing unverified is read)."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="mose-full-") as folder:
        config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in state.items()}, f"{folder}/model.safetensors")
        model = AutoModelForCausalLM.from_pretrained(folder, **plan.from_pretrained_kwargs())
    return model.eval()


def tokenizer_from_verified(verified: VerifiedFiles) -> Any | None:
    """The expert's own tokenizer when it ships ``tokenizer.json``, else None (use the base's)."""
    if "tokenizer.json" not in verified.files:
        return None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    kwargs = {}
    if "tokenizer_config.json" in verified.files:
        kwargs = {
            k: v
            for k, v in verified.json("tokenizer_config.json").items()
            if k in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template", "model_max_length")
        }
    if "chat_template.jinja" in verified.files:
        kwargs["chat_template"] = verified.files["chat_template.jinja"].decode("utf-8")
    backend = Tokenizer.from_str(verified.files["tokenizer.json"].decode("utf-8"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
