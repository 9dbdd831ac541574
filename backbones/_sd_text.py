"""The CLIP text encoder of Stable Diffusion, written out so that ``sd`` needs no ``transformers``.

Stable Diffusion conditions its UNet on the last hidden state (after the final LayerNorm) of a CLIP
text transformer: OpenAI CLIP ViT-L/14 (12 layers, quick-GELU) in SD 1.x, OpenCLIP ViT-H/14 cut to its
first 23 layers (GELU) in SD 2.x. :class:`CLIPTextEncoder` keeps the module names of ``transformers``'
``CLIPTextModel`` (``text_model.encoder.layers.0.self_attn.q_proj.weight``, ...), so a diffusers folder's
``text_encoder/model.safetensors`` loads strictly as it is; the config uses the same field names.

Tokens: the empty prompt is ``[bos, eos, pad, ...]`` whatever the vocabulary, so it needs only the
three special ids (declared in the arch, or read from the folder's tokenizer files). Another prompt
needs CLIP's BPE tokenizer, taken from ``transformers`` when that is installed.

Example:
    >>> import torch
    >>> enc = CLIPTextEncoder(TextConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                                  num_attention_heads=2, max_position_embeddings=4))
    >>> enc(torch.tensor([[8, 9, 9, 9]])).shape
    torch.Size([1, 4, 8])
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from bench.errors import BenchError, CheckpointError


@dataclass(frozen=True)
class TextConfig:
    """The fields of a ``CLIPTextConfig`` (``text_encoder/config.json``) that shape the network.

    Example:
        >>> TextConfig.from_dict({"hidden_size": 24, "architectures": ["CLIPTextModel"]}).hidden_size
        24
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TextConfig":
        """Keep the known fields, ignore the rest (architectures, token ids, versions...)."""
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in names})
        if config.hidden_act not in ("quick_gelu", "gelu"):
            raise BenchError(f"sd text encoder: hidden_act {config.hidden_act!r} is not supported (quick_gelu, gelu)")
        if config.hidden_size % config.num_attention_heads:
            raise BenchError(f"sd text encoder: hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Attention(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c.hidden_size, c.hidden_size) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # CLIP's text transformer is causal: token i sees tokens 0..i only.
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.quick = c.hidden_act == "quick_gelu"
        self.fc1, self.fc2 = nn.Linear(c.hidden_size, c.intermediate_size), nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else nn.functional.gelu(h)
        return self.fc2(h)


class _Layer(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.layer_norm1, self.layer_norm2 = (nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) for _ in range(2))
        self.self_attn, self.mlp = _Attention(c), _MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class _TextModel(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.embeddings, self.encoder = _Embeddings(c), _Encoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """Token ids ``[B, L]`` -> last hidden state ``[B, L, hidden_size]`` (what SD's UNet attends to)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = _TextModel(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.text_model
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = m.embeddings.token_embedding(ids) + m.embeddings.position_embedding(positions)
        for layer in m.encoder.layers:
            h = layer(h)
        return m.final_layer_norm(h)


def text_state_dict(state_dict: Mapping[str, torch.Tensor], config: TextConfig) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModel`` state dict without what the encoder does not use: the ``position_ids`` buffer
    of older saves, a projection head, layers beyond ``num_hidden_layers`` (SD 2.x keeps 23 of 24).

    Example:
        >>> sorted(text_state_dict({"text_model.embeddings.position_ids": 0, "text_model.encoder.layers.3.x": 1,
        ...                         "text_model.encoder.layers.0.x": 2}, TextConfig(num_hidden_layers=1)))
        ['text_model.encoder.layers.0.x']
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            key = f"text_model.{key}"  # transformers 5 names the same tensors without the prefix
        if key.endswith("position_ids") or key.startswith(("text_projection", "logit_scale")):
            continue
        parts = key.split(".")
        if parts[:3] == ["text_model", "encoder", "layers"] and int(parts[3]) >= config.num_hidden_layers:
            continue
        out[key] = value
    return out


def empty_prompt_ids(tokens: Mapping[str, int], length: int) -> list[int]:
    """Token ids of ``""``: start, end, then padding to ``length`` (CLIP's tokenizer with padding="max_length").

    Example:
        >>> empty_prompt_ids({"bos": 49406, "eos": 49407, "pad": 0}, 5)
        [49406, 49407, 0, 0, 0]
    """
    return [int(tokens["bos"]), int(tokens["eos"])] + [int(tokens["pad"])] * (length - 2)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def folder_special_ids(tokenizer_dir: Path) -> dict[str, int]:
    """bos/eos/pad ids from a diffusers folder's ``tokenizer/`` (``vocab.json`` + the special tokens map).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "vocab.json").write_text('{"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}')
        >>> _ = (d / "special_tokens_map.json").write_text('{"pad_token": "!"}')
        >>> folder_special_ids(d)
        {'bos': 1, 'eos': 2, 'pad': 0}
    """
    vocab = _read_json(tokenizer_dir / "vocab.json")
    special: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins, as in transformers
        if (tokenizer_dir / name).is_file():
            special.update(_read_json(tokenizer_dir / name))
    names = {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"}
    for key in names:
        token = special.get(f"{key}_token")
        if isinstance(token, dict):  # an AddedToken written out
            token = token.get("content")
        if isinstance(token, str):
            names[key] = token
    missing = [t for t in names.values() if t not in vocab]
    if missing:
        raise CheckpointError(f"{tokenizer_dir / 'vocab.json'} has no token {missing[0]!r}")
    return {key: int(vocab[token]) for key, token in names.items()}


def prompt_ids(prompt: str, tokens: Mapping[str, int], length: int, tokenizer_dir: Path | None) -> list[int]:
    """Token ids of ``prompt``: the empty prompt from the special ids, any other one with CLIP's BPE
    (``transformers.CLIPTokenizer`` on the folder's tokenizer files).

    Example:
        >>> prompt_ids("", {"bos": 3, "eos": 4, "pad": 4}, 4, None)
        [3, 4, 4, 4]
    """
    if prompt == "":
        return empty_prompt_ids(tokens, length)
    if tokenizer_dir is None:
        raise BenchError(f"sd prompt {prompt!r} needs CLIP's tokenizer files: load the weights from a diffusers "
                         f"folder (with tokenizer/), or use the empty prompt")
    try:
        from transformers import CLIPTokenizer
    except ImportError as err:
        raise BenchError(f"sd prompt {prompt!r} needs the `transformers` package for CLIP's BPE tokenizer "
                         f"(pip install transformers), or use the empty prompt") from err
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return list(tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids)
