"""ALAE checkpoint files: the ``Checkpointer.save`` container read without executing code.

An official file is ``torch.save({'models': {group: state_dict}, 'auxiliary': {...}, ...})``. Training
checkpoints keep, under ``auxiliary``, optimizer and scheduler states (plain data) and the loss tracker,
whose running means are objects of ALAE's own classes ``tracker.RunningMean`` / ``tracker.RunningMeanTorch``.
``torch.load(weights_only=True)`` refuses those, so the file goes through the restricted unpickler of
:mod:`bench.safe_pickle`: torch's tensor-rebuild globals, plus exactly these two classes mapped to inert
stubs (their content is never used). Anything else (``os.system``, ``builtins.exec``, ...) is refused.

We keep the EMA copies the demos load (spec 2.4): ``discriminator_s`` (encoder), ``generator_s``
(decoder), ``mapping_tl_s``, ``mapping_fl_s`` and ``dlatent_avg``, flattened to ``group.param`` keys.
A flat ``group.param`` state dict (``.safetensors`` or a torch file), or one in the layout of the official
``Model.state_dict()`` (``encoder.``, ``decoder.``, ...), is accepted as well.

Example:
    >>> EMA_GROUPS[:2]
    ('discriminator_s', 'generator_s')
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from bench.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from backbones._alae_net import ALAEArch

#: the checkpoint groups the model is built from, in state-dict order (non-EMA groups are ignored)
EMA_GROUPS = ("discriminator_s", "generator_s", "mapping_tl_s", "mapping_fl_s", "dlatent_avg")
#: ``Model.state_dict()`` prefixes (a user's own save of the whole model) -> checkpoint group names
_MODEL_PREFIXES = {"encoder.": "discriminator_s.", "decoder.": "generator_s.", "mapping_tl.": "mapping_tl_s.",
                   "mapping_fl.": "mapping_fl_s.", "dlatent_avg.": "dlatent_avg."}
#: ALAE's own classes pickled in ``auxiliary['tracker']``: (module, name) pairs given inert stubs
TRACKER_CLASSES = (("tracker", "RunningMean"), ("tracker", "RunningMeanTorch"))


def _tracker_stubs() -> dict[tuple[str, str], Any]:
    from bench.safe_pickle import make_stub

    return {pair: make_stub(*pair) for pair in TRACKER_CLASSES}


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_container(path: str | Path) -> Any:
    """The unpickled content of an ALAE torch file, tracker objects replaced by stubs; no code runs.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "model.pth"
        >>> torch.save({"models": {"dlatent_avg": {"buff": torch.zeros(2, 4)}}, "auxiliary": {}}, p)
        >>> sorted(read_container(p))
        ['auxiliary', 'models']
    """
    from bench.safe_pickle import load_torch_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"alae checkpoint file not found: {path}")
    try:
        return load_torch_file(path, extra_allowed=_tracker_stubs())
    except CheckpointError as err:
        if str(path) in str(err):
            raise
        raise CheckpointError(f"alae checkpoint {path}: {err}") from err


def ema_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """``{'models': {group: sd}}`` -> the EMA groups as one ``group.param`` dict.

    A flat dict passes through; one in the layout of the official ``Model.state_dict()`` (``encoder.``,
    ``decoder.``, ``mapping_tl.``, ``mapping_fl.``, ``dlatent_avg.``) gets the group names.

    Example:
        >>> sd = ema_state_dict({"models": {g: {"w": torch.zeros(1)} for g in EMA_GROUPS + ("generator",)}}, "f")
        >>> list(sd)[:2], "generator.w" in sd
        (['discriminator_s.w', 'generator_s.w'], False)
        >>> list(ema_state_dict({"decoder.const": torch.ones(1), "encoder.x": torch.ones(1)}, "f"))
        ['generator_s.const', 'discriminator_s.x']
    """
    if _is_tensor_dict(obj):
        if obj and all(k.startswith(tuple(_MODEL_PREFIXES)) for k in obj):
            return {_MODEL_PREFIXES[k.split(".", 1)[0] + "."] + k.split(".", 1)[1]: v for k, v in obj.items()}
        return dict(obj)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("models"), Mapping):
        top = ", ".join(repr(k) for k in list(obj)[:10]) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"alae checkpoint {source} has no 'models' dict of groups (the Checkpointer.save "
                              f"layout) and is not a flat state dict; top level: {top}")
    models = obj["models"]
    out: dict[str, torch.Tensor] = {}
    for group in EMA_GROUPS:
        if group not in models:
            present = ", ".join(repr(g) for g in models) or "none"
            raise CheckpointError(f"alae checkpoint {source} has no group {group!r} under 'models' (groups: "
                                  f"{present}); the features need the EMA groups {', '.join(EMA_GROUPS)}")
        params = models[group]
        if not _is_tensor_dict(params):
            raise CheckpointError(f"group {group!r} of alae checkpoint {source} is not a dict of tensors")
        out.update({f"{group}.{k}": v for k, v in params.items()})
    return out


def read_alae_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``group.param`` state dict of an ALAE file: official container, torch state dict or safetensors.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "flat.pt"
        >>> torch.save({"dlatent_avg.buff": torch.zeros(2, 4)}, p)
        >>> list(read_alae_state_dict(p))
        ['dlatent_avg.buff']
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from bench.checkpoints import load_state_dict

        return load_state_dict(path)
    return ema_state_dict(read_container(path), str(path))


def _indices(keys: Sequence[str], prefix: str) -> int:
    """How many consecutive ``prefix<i>.`` entries (i = 0, 1, ...) the keys hold."""
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in keys
             if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    return len(found) if found == set(range(len(found))) else -1


def infer_arch(state_dict: Mapping[str, torch.Tensor], source: str) -> "ALAEArch":
    """The architecture implied by a ``group.param`` state dict's keys and shapes (ALAE files store none).

    Every field is determined: ``maxf`` is the widest layer (any larger value builds the same network).
    Inconsistent files are caught by the strict load that follows.

    Example:
        >>> from backbones._alae_net import ALAE, ALAEArch
        >>> sd = ALAE(ALAEArch(layer_count=3, startf=4, maxf=16, latent_size=8, mapping_layers=2)).state_dict()
        >>> infer_arch(sd, "x")
        ALAEArch(layer_count=3, startf=4, maxf=16, latent_size=8, mapping_layers=2, mapping_tl_layers=3, channels=3)
    """
    from backbones._alae_net import ALAEArch

    keys = list(state_dict)

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointError(f"cannot infer the ALAE architecture of {source}: key {key!r} is missing; "
                                  f"pass arch={{'layer_count': ..., 'startf': ...}}")
        return tuple(state_dict[key].shape)

    counts = {p: _indices(keys, p) for p in ("generator_s.decode_block.", "discriminator_s.encode_block.",
                                             "mapping_fl_s.map_blocks.", "mapping_tl_s.map_blocks.")}
    bad = [p for p, n in counts.items() if n <= 0]
    if bad:
        raise CheckpointError(f"cannot infer the ALAE architecture of {source}: no consecutive '{bad[0]}<i>' "
                              f"entries; pass arch={{'layer_count': ..., 'startf': ...}}")
    layers = counts["generator_s.decode_block."]
    rgb = shape("discriminator_s.from_rgb.0.from_rgb.weight")
    widest = max(shape(f"discriminator_s.encode_block.{layers - 1}.conv_2.weight")[0], shape("generator_s.const")[1])
    return ALAEArch(layer_count=layers, startf=rgb[0], maxf=widest,
                    latent_size=shape("generator_s.decode_block.0.style_1.weight")[1],
                    mapping_layers=counts["mapping_fl_s.map_blocks."],
                    mapping_tl_layers=counts["mapping_tl_s.map_blocks."], channels=rgb[1])
