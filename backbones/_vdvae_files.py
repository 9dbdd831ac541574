"""VDVAE checkpoint files: safe reading, the two official flavours, and hyper-parameters from shapes.

The official checkpoints are bare ``torch.save(state_dict)`` pickles: ``*-model-ema.th`` without a
prefix, ``*-model.th`` saved from the DDP model with ``module.`` on every key. They store no
hyper-parameters, so :func:`infer_hparams` reads what the tensor shapes determine unambiguously.
Before ``torch.load(weights_only=True)`` reads a pickle, :func:`check_pickle_globals` lists the
globals it references (without executing anything) and refuses any that a tensor file never needs,
naming it: torch's own refusal does not always say which global it met. Private to ``backbones``.

Example:
    >>> infer_hparams({"encoder.in_conv.weight": torch.zeros(8, 3, 3, 3)})
    {'width': 8, 'image_channels': 3}
"""
from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from bench.errors import CheckpointError

#: globals a torch tensor pickle legitimately needs (torch rebuild helpers and storage classes are
#: checked again, more finely, by torch's weights-only unpickler)
_SAFE_MODULES = ("torch",)
_SAFE_GLOBALS = {("collections", "OrderedDict"), ("_codecs", "encode")}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
#: the legacy (non-zip) torch format is five pickles in a row, then raw storage bytes
_LEGACY_PICKLES = 5


def _pickle_globals(data: bytes, limit: int) -> list[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL / INST in the first ``limit`` pickles of ``data``.

    Only opcodes are decoded (pickletools), nothing is built or called. STACK_GLOBAL takes its names from
    the stack; we follow string pushes and the memo, which is how pickle writes them.
    """
    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(limit):
        if stream.tell() >= len(data):
            break
        strings: list[Any] = []
        memo: dict[Any, Any] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    found.append(f"{module}.{attr}")
                elif name == "STACK_GLOBAL":
                    module, attr = (strings[-2], strings[-1]) if len(strings) >= 2 else (None, None)
                    if not (isinstance(module, str) and isinstance(attr, str)):
                        found.append("<STACK_GLOBAL with a computed name>")
                    else:
                        found.append(f"{module}.{attr}")
                elif name in _STRING_OPS:
                    strings.append(arg)
                elif name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = strings[-1] if strings else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    strings.append(memo.get(arg))
        except Exception:  # the raw storage bytes after the last pickle, or garbage: torch.load decides
            break
    return found


def pickle_globals(path: Path) -> list[str]:
    """The globals a torch checkpoint's pickle(s) reference, in file order (``module.name``).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "w.th"
        >>> torch.save({"w": torch.zeros(1)}, p)
        >>> sorted(set(pickle_globals(p)))
        ['collections.OrderedDict', 'torch.FloatStorage', 'torch._utils._rebuild_tensor_v2']
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".pkl")]
            return [g for n in names for g in _pickle_globals(archive.read(n), 1)]
    return _pickle_globals(path.read_bytes(), _LEGACY_PICKLES)


def check_pickle_globals(path: Path) -> None:
    """Refuse a pickle that references anything but torch tensor-rebuilding globals, naming it.

    Example:
        >>> import pickle, tempfile
        >>> p = Path(tempfile.mkdtemp()) / "evil.th"
        >>> _ = p.write_bytes(pickle.dumps(print, protocol=4))
        >>> check_pickle_globals(p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        bench.errors.CheckpointError: checkpoint ... refers to the Python global builtins.print, ...
    """
    for name in pickle_globals(path):
        module, _, attr = name.rpartition(".")
        if (module, attr) in _SAFE_GLOBALS or any(module == m or module.startswith(m + ".") for m in _SAFE_MODULES):
            continue
        raise CheckpointError(f"checkpoint {path} refers to the Python global {name}, which a VDVAE state dict "
                              f"never needs; refused, nothing from the file was executed")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A VDVAE state dict from ``path`` (``.th``/``.pt`` pickle or ``.safetensors``), ``module.`` stripped.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "ddp-model.th"
        >>> torch.save({"module.decoder.gain": torch.ones(1, 4, 1, 1)}, p)
        >>> list(read_state_dict(p))
        ['decoder.gain']
    """
    from backbones._checkpoint_files import strip_common_prefix
    from bench.checkpoints import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"vdvae checkpoint file not found: {path}")
    if path.suffix != ".safetensors":
        check_pickle_globals(path)
    return strip_common_prefix(load_state_dict(path), "module.")


def _shape(sd: Mapping[str, torch.Tensor], key: str, rank: int) -> tuple[int, ...] | None:
    value = sd.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) and value.dim() == rank else None


def infer_hparams(sd: Mapping[str, torch.Tensor], enc_layers: list[tuple[int, int | None]] | None = None,
                  dec_layers: list[tuple[int, int | None]] | None = None) -> dict[str, Any]:
    """Hyper-parameters that the state dict's shapes determine, under their official names.

    Without block lists: ``width``, ``image_channels``, ``zdim``, ``num_mixtures``, ``no_bias_above`` (as
    the largest resolution with a learned start state). With the block lists (which no shape encodes)
    also ``custom_width_str`` and ``bottleneck_multiple``. Entries that are absent or malformed are left
    out; the strict load names them later.

    Example:
        >>> sd = {"decoder.bias_xs.0": torch.zeros(1, 8, 1, 1), "decoder.bias_xs.1": torch.zeros(1, 8, 4, 4)}
        >>> infer_hparams(sd)
        {'no_bias_above': 4}
    """
    out: dict[str, Any] = {}
    gain, stem = _shape(sd, "decoder.gain", 4), _shape(sd, "encoder.in_conv.weight", 4)
    if gain:
        out["width"] = gain[1]
    elif stem:
        out["width"] = stem[0]
    if stem:
        out["image_channels"] = stem[1]
    z_proj = _shape(sd, "decoder.dec_blocks.0.z_proj.weight", 4)
    if z_proj:
        out["zdim"] = z_proj[1]
    head = _shape(sd, "decoder.out_net.out_conv.weight", 4)
    if head and head[0] % 10 == 0:
        out["num_mixtures"] = head[0] // 10
    bias_widths = {s[2]: s[1] for k in sd if k.startswith("decoder.bias_xs.") and (s := _shape(sd, k, 4))}
    if any(k.startswith("decoder.") for k in sd):
        # Learned start states exist exactly for the decoder resolutions <= no_bias_above.
        out["no_bias_above"] = max(bias_widths, default=0)
    if enc_layers is None or dec_layers is None or "width" not in out:
        return out
    widths: dict[int, int] = dict(bias_widths)
    middles: list[tuple[int, int]] = []
    for i, (res, _down) in enumerate(enc_layers):
        c1 = _shape(sd, f"encoder.enc_blocks.{i}.c1.weight", 4)
        if c1:
            widths.setdefault(res, c1[1])
            middles.append((c1[1], c1[0]))
    for i, (res, _mixin) in enumerate(dec_layers):
        proj = _shape(sd, f"decoder.dec_blocks.{i}.z_proj.weight", 4)
        if proj:
            widths.setdefault(res, proj[0])
    out["custom_width_str"] = ",".join(f"{r}:{w}" for r, w in sorted(widths.items(), reverse=True)
                                       if w != out["width"])
    if middles:
        multiple = middles[0][1] / middles[0][0]
        if all(int(w * multiple) == m for w, m in middles):
            out["bottleneck_multiple"] = multiple
    return out
