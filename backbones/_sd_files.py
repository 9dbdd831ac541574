"""Stable Diffusion weights on disk: a diffusers folder or one original (LDM-layout) safetensors file.

Both are read without executing anything: safetensors only (``.bin``/``.ckpt``/``.pt`` pickles are refused),
every component checked key by key and shape by shape (:func:`bench.checkpoints.load_strict`).

- A **folder** (``save_pretrained`` / a Hugging Face snapshot) has ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/`` and ``scheduler/``; its configs define the architecture (so a random-init control of it
  reads them and nothing else). Its digest is the sha256 of the list of (file, sha256) it was built from.
- A **single file** (``v1-5-pruned-emaonly.safetensors``) holds the three networks in the original layout;
  diffusers' converters map it onto the architecture declared by the weights tag. Its digest is its sha256.

Example:
    >>> PARTS["scheduler"]
    'scheduler_config.json'
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

from bench.errors import CheckpointError

#: the sub-folders we read, and the config file of each
PARTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
         "tokenizer": "vocab.json", "scheduler": "scheduler_config.json"}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def refuse_pickle(path: Path) -> None:
    """One line for a pickle checkpoint: only safetensors are loaded (a pickle can run code when read).

    Example:
        >>> refuse_pickle(Path("model.ckpt"))
        Traceback (most recent call last):
        bench.errors.CheckpointError: sd loads safetensors only; model.ckpt is a pickle (.ckpt), refused: convert it to .safetensors or give a diffusers folder
    """
    if path.suffix != ".safetensors":
        kind = f"a pickle ({path.suffix})" if path.suffix in PICKLE_SUFFIXES else f"not a .safetensors file"
        raise CheckpointError(f"sd loads safetensors only; {path} is {kind}, refused: convert it to .safetensors "
                              f"or give a diffusers folder")


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"diffusers folder incomplete: {path} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config without diffusers' bookkeeping (``_class_name``, ``_diffusers_version``, ...)."""
    return {k: v for k, v in data.items() if not k.startswith("_")}


def folder_arch(folder: Path) -> dict[str, Any]:
    """The architecture of a diffusers folder (our arch layout), from its config files only.

    Example:
        >>> # folder_arch(Path("stable-diffusion-2-1"))["unet"]["cross_attention_dim"] -> 1024
    """
    from backbones._sd_text import folder_special_ids

    folder = Path(folder)
    arch = {part: _config(_json(folder / part / name)) for part, name in PARTS.items() if part != "tokenizer"}
    arch["tokens"] = folder_special_ids(folder / "tokenizer")
    return arch


def _weights_file(part_dir: Path, names: tuple[str, ...]) -> Path:
    """The safetensors file of one component (full precision first, else the fp16 variant)."""
    for name in names:
        stem = name.rsplit(".", 1)[0]
        for candidate in (part_dir / name, part_dir / f"{stem}.fp16.safetensors"):
            if candidate.is_file():
                return candidate
    pickles = sorted(p.name for p in part_dir.glob("*") if p.suffix in PICKLE_SUFFIXES) if part_dir.is_dir() else []
    extra = f" (found only pickles {pickles}, which are refused)" if pickles else ""
    raise CheckpointError(f"no safetensors weights in {part_dir}: expected {names[0]}{extra}")


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file a folder load reads, by relative path (weights, configs, tokenizer files)."""
    folder = Path(folder)
    files = {f"{part}/{name}": folder / part / name for part, name in PARTS.items()}
    files["unet/weights"] = _weights_file(folder / "unet", ("diffusion_pytorch_model.safetensors",))
    files["vae/weights"] = _weights_file(folder / "vae", ("diffusion_pytorch_model.safetensors",))
    files["text_encoder/weights"] = _weights_file(folder / "text_encoder", ("model.safetensors",))
    for name in TOKENIZER_FILES:
        if (folder / "tokenizer" / name).is_file():
            files[f"tokenizer/{name}"] = folder / "tokenizer" / name
    return files


def folder_digest(files: Mapping[str, Path]) -> str:
    """sha256 of the sorted (relative name, file sha256) list: one digest for the whole folder.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a"
        >>> _ = p.write_text("x")
        >>> len(folder_digest({"a": p}))
        64
    """
    from bench.hub import sha256_file

    listing = sorted((name, path.name, sha256_file(path)) for name, path in files.items())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def load_folder(models: Mapping[str, Any], files: Mapping[str, Path]) -> None:
    """Load unet, vae and text_encoder of a folder strictly into ``models`` (built from its configs)."""
    from backbones._sd_text import text_state_dict
    from bench.checkpoints import load_state_dict, load_strict

    for part in ("unet", "vae", "text_encoder"):
        path = files[f"{part}/weights"]
        state = load_state_dict(path)
        if part == "text_encoder":
            state = text_state_dict(state, models[part].config)
        load_strict(models[part], state, source=str(path))


def load_single_file(models: Mapping[str, Any], arch: Mapping[str, Any], path: Path) -> None:
    """Split one original-layout safetensors into unet, vae and text encoder (diffusers' converters) and
    load each strictly. SD 1.x holds a ``transformers``-layout CLIP (``cond_stage_model.transformer.``),
    SD 2.x an OpenCLIP one (``cond_stage_model.model.``)."""
    from diffusers.loaders import single_file_utils as sfu

    from backbones._sd_text import text_state_dict
    from bench.checkpoints import load_state_dict, load_strict

    refuse_pickle(path)
    state = load_state_dict(path)
    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise CheckpointError(f"{path} is not an original Stable Diffusion checkpoint (no model.diffusion_model.* keys)")
    load_strict(models["unet"], sfu.convert_ldm_unet_checkpoint(state, dict(arch["unet"])), source=f"{path} (unet)")
    load_strict(models["vae"], sfu.convert_ldm_vae_checkpoint(state, dict(arch["vae"])), source=f"{path} (vae)")
    if any(k.startswith("cond_stage_model.model.") for k in state):
        holder = SimpleNamespace(config=SimpleNamespace(hidden_size=arch["text_encoder"]["hidden_size"]))
        text = sfu.convert_open_clip_checkpoint(holder, state)
    else:
        text = sfu.convert_ldm_clip_checkpoint(state)
    text = text_state_dict(text, models["text_encoder"].config)
    load_strict(models["text_encoder"], text, source=f"{path} (text encoder)")
