"""e4e / pSp checkpoint files: read the container safely, take its architecture, load both halves strictly.

The official container is ``torch.save({'state_dict': {encoder.*, decoder.*}, 'opts': vars(args),
'latent_avg': [n_styles, 512], ...})`` (training saves may add ``global_step``, ``optimizer``,
``best_val_loss``, ``discriminator_state_dict``, which are ignored). It is read with
``torch.load(weights_only=True)`` through :mod:`bench.checkpoints`, so a pickled object that is not plain
data is refused and nothing from the file runs. ``opts`` supplies ``stylegan_size``,
``encoder_type`` and ``start_from_latent_avg``; the state dict is split at ``encoder.`` / ``decoder.``
and each half loads strictly (a key outside both halves is an error, not silently dropped).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> p = Path(tempfile.mkdtemp()) / "e4e.pt"
    >>> torch.save({"state_dict": {"encoder.w": torch.ones(1)}, "opts": {"stylegan_size": 64}}, p)
    >>> c = read_container(p)
    >>> sorted(c.state_dict), arch_from_opts(c.opts, str(p))
    (['encoder.w'], {'size': 64})
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from bench.errors import CheckpointError

#: ``opts`` entries that fix the architecture -> our arch keys (``output_size`` is pSp's name of the size)
OPTS_TO_ARCH = {"stylegan_size": "size", "output_size": "size", "encoder_type": "encoder_type",
                "start_from_latent_avg": "start_from_latent_avg"}
PREFIXES = ("encoder.", "decoder.")


@dataclass
class E4EContainer:
    """The parts of an e4e checkpoint we use."""

    path: str
    state_dict: dict[str, torch.Tensor]
    opts: dict[str, Any] | None
    latent_avg: torch.Tensor | None


def read_container(path: str | Path) -> E4EContainer:
    """Read an e4e/pSp ``torch.save`` container without executing code from it.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "bad.pt"
        >>> torch.save([1, 2], p)
        >>> read_container(p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        bench.errors.CheckpointError: checkpoint ... holds a list, not an e4e/pSp container dict with 'state_dict', 'opts' and 'latent_avg'
    """
    from bench.checkpoints import _torch_load_weights_only

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"e4e checkpoint file not found: {path}")
    obj = _torch_load_weights_only(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not an e4e/pSp container dict "
                              f"with 'state_dict', 'opts' and 'latent_avg'")
    state = obj.get("state_dict")
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        top = ", ".join(repr(k) for k in list(obj)[:20]) or "none"
        raise CheckpointError(f"checkpoint {path} has no 'state_dict' dict of tensors (top-level keys: {top}); "
                              f"an e4e/pSp container is {{'state_dict', 'opts', 'latent_avg'}}")
    opts = obj.get("opts")
    if opts is not None and not isinstance(opts, Mapping):
        opts = getattr(opts, "__dict__", None)  # an argparse.Namespace (allowed by the safe loader)
        if not isinstance(opts, Mapping):
            raise CheckpointError(f"entry 'opts' of checkpoint {path} is a {type(obj['opts']).__name__}, not a dict")
    latent_avg = obj.get("latent_avg")
    if latent_avg is not None and not torch.is_tensor(latent_avg):
        raise CheckpointError(f"entry 'latent_avg' of checkpoint {path} is a {type(latent_avg).__name__}, "
                              f"not a tensor")
    return E4EContainer(str(path), dict(state), dict(opts) if opts is not None else None, latent_avg)


def arch_from_opts(opts: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    """The architecture entries stored in ``opts`` (absent ones are left to the caller's defaults).

    e4e names the generator size ``stylegan_size``, pSp ``output_size``; a stored ``n_styles`` must
    agree with it and ``input_nc`` must be 3 (an RGB-image encoder).

    Example:
        >>> arch_from_opts({"stylegan_size": 1024, "encoder_type": "Encoder4Editing", "lr": 1e-4}, "ck.pt")
        {'size': 1024, 'encoder_type': 'Encoder4Editing'}
        >>> arch_from_opts({"output_size": 256, "n_styles": 18}, "psp.pt")
        Traceback (most recent call last):
        bench.errors.CheckpointError: opts of checkpoint psp.pt say n_styles 18, but a 256 px generator has 14 W+ rows
    """
    out: dict[str, Any] = {}
    opts = opts or {}
    for key, name in OPTS_TO_ARCH.items():
        value = opts.get(key)
        if value is None:
            continue
        expected = str if name == "encoder_type" else bool if name == "start_from_latent_avg" else int
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise CheckpointError(f"opts[{key!r}] of checkpoint {source} is {value!r}, expected {expected.__name__}")
        if name in out and out[name] != value:
            raise CheckpointError(f"opts of checkpoint {source} disagree: stylegan_size {out[name]} vs "
                                  f"output_size {value}")
        out[name] = value
    size, rows = out.get("size"), opts.get("n_styles")
    if isinstance(size, int) and size > 0 and isinstance(rows, int) and rows != 2 * (size.bit_length() - 1) - 2:
        raise CheckpointError(f"opts of checkpoint {source} say n_styles {rows}, but a {size} px generator has "
                              f"{2 * (size.bit_length() - 1) - 2} W+ rows")
    if opts.get("input_nc", 3) != 3:
        raise CheckpointError(f"checkpoint {source} encodes {opts['input_nc']}-channel inputs (opts input_nc); "
                              f"only RGB-image encoders give image features")
    return out


def split_halves(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    """``encoder.*`` and ``decoder.*`` with the prefix removed; any other key is an error naming it.

    Example:
        >>> split_halves({"encoder.a": 1, "decoder.b": 2}, "ck.pt")
        ({'a': 1}, {'b': 2})
    """
    halves: tuple[dict, dict] = ({}, {})
    for key, value in state_dict.items():
        for half, prefix in zip(halves, PREFIXES):
            if key.startswith(prefix):
                half[key[len(prefix):]] = value
                break
        else:
            raise CheckpointError(f"checkpoint {source} does not fit the model: unexpected key {key!r} "
                                  f"(shape {tuple(value.shape)}); e4e keys start with 'encoder.' or 'decoder.'")
    return halves


def check_container(encoder: torch.nn.Module, decoder: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                    source: str) -> None:
    """Strict key/shape check of the whole state dict, errors naming the full ``encoder.``/``decoder.`` key.

    Example:
        >>> check_container(torch.nn.Linear(1, 1), torch.nn.Identity(), {"encoder.weight": torch.zeros(1, 1)}, "ck")
        Traceback (most recent call last):
        bench.errors.CheckpointError: checkpoint ck does not fit the model: missing key 'encoder.bias' (expected shape (1,)) (1 missing, 0 unexpected, 0 wrong shape)
    """
    from bench.checkpoints import check_state_dict

    expected = {f"{prefix}{k}": tuple(v.shape) for prefix, module in zip(PREFIXES, (encoder, decoder))
                for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, source=source)


def checked_latent_avg(latent_avg: torch.Tensor | None, n_styles: int, style_dim: int, source: str) -> torch.Tensor:
    """``latent_avg`` as ``[n_styles, style_dim]`` float32; ``[style_dim]`` or ``[1, style_dim]`` broadcast.

    Example:
        >>> checked_latent_avg(torch.ones(4), 3, 4, "ck").shape
        torch.Size([3, 4])
    """
    if latent_avg is None:
        raise CheckpointError(f"checkpoint {source} has no 'latent_avg' but its opts say start_from_latent_avg; "
                              f"the codes would be off by the mean latent")
    shape = tuple(latent_avg.shape)
    if shape not in ((n_styles, style_dim), (1, style_dim), (style_dim,)):
        raise CheckpointError(f"'latent_avg' of checkpoint {source} has shape {shape}, expected "
                              f"({n_styles}, {style_dim})")
    return latent_avg.detach().to(torch.float32).reshape(-1, style_dim).expand(n_styles, style_dim).clone()
