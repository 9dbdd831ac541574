"""The ADM UNet of guided-diffusion (Dhariwal & Nichol 2021), written from the protocol spec.

Module names and their order reproduce the official state-dict layout exactly (``time_embed.0.weight``,
``input_blocks.10.1.qkv.weight``, ``output_blocks.5.2.in_layers.0.weight``, ``out.2.bias``, ...), so the
official ``.pt`` checkpoints load with ``strict=True``. ``ADMFlags`` uses the official command-line flag
names and defaults, so a model is described by the same flags as in the guided-diffusion README.

Example:
    >>> import torch
    >>> flags = ADMFlags(image_size=32, num_channels=32, channel_mult="1,2", attention_resolutions="16")
    >>> net = ADMUNet(flags)
    >>> net(torch.zeros(1, 3, 32, 32), torch.tensor([10])).shape
    torch.Size([1, 3, 32, 32])
    >>> net.block_shapes()
    [(64, 16), (64, 16), (64, 32), (32, 32), (32, 32), (32, 32)]
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import operator
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError

NUM_CLASSES = 1000  # class_cond models are ImageNet models in guided-diffusion
GROUPS = 32  # GroupNorm groups of every normalisation layer (eps 1e-5)
_DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
# Official flags that change only training or sampling, never the network or q_sample: accepted, ignored.
_IGNORED_FLAGS = frozenset({"use_checkpoint", "use_kl", "predict_xstart", "rescale_learned_sigmas"})
# Official flags that would change what the network sees; only their defaults are supported.
_DEFAULT_ONLY_FLAGS = {"timestep_respacing": "", "rescale_timesteps": False}


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise BenchError(f"ADM flag {key!r}: expected a boolean, got {value!r}")


def _parse_number(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise BenchError(f"ADM flag {key!r}: expected {kind.__name__}, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise BenchError(f"ADM flag {key!r}: expected {kind.__name__}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise BenchError(f"ADM flag {key!r}: expected an integer, got {value!r}")
    return number


def _parse_list(key: str, value: Any) -> str:
    # "1,1,2" stays as is; [1, 1, 2] / (32, 16) / 16 become the official comma-separated string.
    if isinstance(value, str):
        return value.replace(" ", "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    raise BenchError(f"ADM flag {key!r}: expected a comma-separated list, got {value!r}")


@dataclass(frozen=True)
class ADMFlags:
    """Architecture and schedule flags, named and defaulted as guided-diffusion's ``model_and_diffusion_defaults``.

    Example:
        >>> f = ADMFlags.from_dict({"image_size": "256", "learn_sigma": "True", "attention_resolutions": [32, 16, 8]})
        >>> f.learn_sigma, f.attention_resolutions, f.resolved_channel_mult()
        (True, '32,16,8', (1, 1, 2, 2, 4, 4))
        >>> f.attention_rates()
        (8, 16, 32)
    """

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: str = ""
    attention_resolutions: str = "16,8"
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_new_attention_order: bool = False
    resblock_updown: bool = False
    use_scale_shift_norm: bool = True
    learn_sigma: bool = False
    class_cond: bool = False
    dropout: float = 0.0
    use_fp16: bool = False
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ADMFlags":
        """Flags from a mapping of official flag names to str/int/bool/list values; missing ones keep defaults.

        Example:
            >>> ADMFlags.from_dict({"channel_mult": (1, 2), "use_fp16": "False"}).channel_mult
            '1,2'
            >>> ADMFlags.from_dict({"num_chanels": 64})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            bench.errors.BenchError: unknown ADM flag 'num_chanels' (did you mean 'num_channels'?); known flags: ...
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in d.items():
            if key in _IGNORED_FLAGS:
                continue
            if key in _DEFAULT_ONLY_FLAGS:
                default = _DEFAULT_ONLY_FLAGS[key]
                parsed = _parse_bool(key, value) if isinstance(default, bool) else value
                if parsed != default:
                    raise BenchError(f"ADM flag {key!r}={value!r} is not supported (only {default!r})")
                continue
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise BenchError(f"unknown ADM flag {key!r}{hint}; known flags: {', '.join(fields)}")
            default = fields[key].default
            if isinstance(default, bool):
                values[key] = _parse_bool(key, value)
            elif key in ("channel_mult", "attention_resolutions"):
                values[key] = _parse_list(key, value)
            elif isinstance(default, (int, float)):
                values[key] = _parse_number(key, value, type(default))
            else:
                values[key] = str(value)
        flags = cls(**values)
        flags.resolved_channel_mult()  # fail early, naming the value, rather than deep inside the model
        flags.attention_rates()
        return flags

    def to_dict(self) -> dict:
        """A JSON-able dict of every flag (round-trips through ``from_dict``).

        Example:
            >>> ADMFlags.from_dict(ADMFlags(channel_mult="1,2").to_dict()) == ADMFlags(channel_mult="1,2")
            True
        """
        return dataclasses.asdict(self)

    def resolved_channel_mult(self) -> tuple[int | float, ...]:
        """Channel multiplier per resolution level; "" picks the official default for the image size.

        Example:
            >>> ADMFlags(image_size=128).resolved_channel_mult()
            (1, 1, 2, 3, 4)
        """
        if self.channel_mult == "":
            if self.image_size not in _DEFAULT_CHANNEL_MULT:
                raise BenchError(
                    f"ADM flag channel_mult is empty and image_size {self.image_size} has no official default "
                    f"(defaults exist for {', '.join(map(str, _DEFAULT_CHANNEL_MULT))}); set channel_mult"
                )
            return _DEFAULT_CHANNEL_MULT[self.image_size]
        try:
            mult = tuple(int(m) for m in self.channel_mult.split(","))
        except ValueError:
            raise BenchError(f"ADM flag channel_mult={self.channel_mult!r} is not a list of integers") from None
        if any(m < 1 for m in mult):
            raise BenchError(f"ADM flag channel_mult={self.channel_mult!r} must hold positive integers")
        return mult

    def attention_rates(self) -> tuple[int, ...]:
        """Downsample rates with attention: the flag lists resolutions, rate = image_size // resolution.

        Example:
            >>> ADMFlags(image_size=64, attention_resolutions="8,4,2").attention_rates()
            (8, 16, 32)
        """
        if self.attention_resolutions == "":
            return ()
        try:
            resolutions = [int(r) for r in self.attention_resolutions.split(",")]
        except ValueError:
            raise BenchError(f"ADM flag attention_resolutions={self.attention_resolutions!r} is not a list of integers") from None
        if any(r < 1 for r in resolutions):
            raise BenchError(f"ADM flag attention_resolutions={self.attention_resolutions!r} must be positive")
        return tuple(self.image_size // r for r in resolutions)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of raw integer steps: [cos(t*f_i), sin(t*f_i)], f_i = max_period^(-i/half).

    Example:
        >>> timestep_embedding(torch.tensor([0]), 4).tolist()
        [[1.0, 1.0, 0.0, 0.0]]
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # odd width: one zero column, so the width is what was asked for
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups) computed in float32 and cast back, so an fp16 torso normalises accurately.

    Example:
        >>> GroupNorm32(64)(torch.ones(1, 64, 2, 2, dtype=torch.float16)).dtype
        torch.float16
    """

    def __init__(self, channels: int) -> None:
        if channels % GROUPS:
            raise BenchError(f"ADM layers need channel counts divisible by {GROUPS} (GroupNorm groups), got {channels}")
        super().__init__(GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _zeroed(module: nn.Module) -> nn.Module:
    # ADM initialises the last conv of every residual branch (and the output head) to zero, so a freshly
    # built network starts as an identity-like map; pretrained weights overwrite this anyway.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Upsample(nn.Module):
    """Nearest 2x upsampling, then an optional 3x3 conv (key ``conv``).

    Example:
        >>> Upsample(32, use_conv=True)(torch.zeros(1, 32, 4, 4)).shape
        torch.Size([1, 32, 8, 8])
    """

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling without conv (key ``op``).

    Example:
        >>> Downsample(32, use_conv=False)(torch.zeros(1, 32, 4, 4)).shape
        torch.Size([1, 32, 2, 2])
    """

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding; optionally resamples (resblock_updown).

    With scale-shift norm the embedding gives (scale, shift) applied as norm(h) * (1 + scale) + shift;
    otherwise it is added to h before the second norm.

    Example:
        >>> block = ResBlock(32, 128, 0.0, 64, use_scale_shift_norm=True, down=True)
        >>> block(torch.zeros(2, 32, 8, 8), torch.zeros(1, 128)).shape
        torch.Size([2, 64, 4, 4])
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int,
                 use_scale_shift_norm: bool, up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            _zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        # 1x1 conv only where the channel count changes (official use_conv=False path).
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample between the activation and the conv, on both the branch and the skip path.
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection.

    Legacy order (the official default, used by every released checkpoint): the qkv channels are
    grouped per head first, [heads x (q, k, v) x ch]. New order: [(q, k, v) x heads x ch].

    Example:
        >>> attention = AttentionBlock(64, num_heads=4, num_head_channels=-1, use_new_attention_order=False)
        >>> attention(torch.zeros(1, 64, 2, 2)).shape
        torch.Size([1, 64, 2, 2])
    """

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, use_new_attention_order: bool) -> None:
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise BenchError(f"ADM attention: {channels} channels are not divisible by num_head_channels={num_head_channels}")
            self.num_heads = channels // num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise BenchError(f"ADM attention: {channels} channels are not divisible by num_heads={self.num_heads}")
        self.new_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length, ch = qkv.shape[-1], c // self.num_heads
        if self.new_order:
            q, k, v = (part.reshape(b * self.num_heads, ch, length) for part in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))  # split between q and k: smaller intermediates in fp16
        weight = torch.bmm((q * scale).transpose(1, 2), k * scale)  # [b*heads, t(query), s(key)]
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        h = torch.bmm(v, weight.transpose(1, 2)).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that also hands the time embedding to the ResBlocks it holds.

    Example:
        >>> seq = TimestepEmbedSequential(nn.Conv2d(3, 32, 3, padding=1), ResBlock(32, 128, 0.0, 32, True))
        >>> seq(torch.zeros(1, 3, 4, 4), torch.zeros(1, 128)).shape
        torch.Size([1, 32, 4, 4])
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _block_index(block: Any, count: int) -> int:
    # Accepts Python and numpy integers; anything else (bools, floats, strings) is a user mistake.
    try:
        index = operator.index(block) if not isinstance(block, bool) else None
    except TypeError:
        index = None
    if index is None or not 0 <= index < count:
        raise BenchError(f"decoder block {block!r} is out of range; valid blocks are 0..{count - 1}")
    return index


class ADMUNet(nn.Module):
    """The guided-diffusion UNet; ``forward_blocks`` returns decoder block outputs and exits early.

    Example:
        >>> import torch
        >>> net = ADMUNet(ADMFlags(image_size=32, num_channels=32, channel_mult="1,1", attention_resolutions=""))
        >>> [f.shape for f in net.forward_blocks(torch.zeros(2, 3, 32, 32), torch.tensor([5]), [3, 1])]
        [torch.Size([2, 32, 16, 16]), torch.Size([2, 32, 32, 32])]
    """

    def __init__(self, flags: ADMFlags) -> None:
        super().__init__()
        self.flags = flags
        mult = flags.resolved_channel_mult()
        rates = set(flags.attention_rates())
        model_ch, emb_ch = flags.num_channels, 4 * flags.num_channels
        heads_up = flags.num_heads if flags.num_heads_upsample == -1 else flags.num_heads_upsample

        def res(ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
            return ResBlock(ch_in, emb_ch, flags.dropout, ch_out, flags.use_scale_shift_norm, **updown)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, flags.num_head_channels, flags.use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(model_ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if flags.class_cond:
            self.label_emb = nn.Embedding(NUM_CLASSES, emb_ch)

        ch = int(mult[0] * model_ch)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(3, ch, 3, padding=1))])
        skip_chans, rate = [ch], 1  # channels of every encoder output, consumed by the decoder in reverse
        for level, m in enumerate(mult):
            for _ in range(flags.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(m * model_ch))]
                ch = int(m * model_ch)
                if rate in rates:
                    layers.append(attn(ch, flags.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(mult) - 1:
                down = res(ch, ch, down=True) if flags.resblock_updown else Downsample(ch, use_conv=True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                rate *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, flags.num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        self._block_layout: list[tuple[int, int]] = []  # per decoder block: (channels, log2 of downsampling)
        for level, m in reversed(list(enumerate(mult))):
            for i in range(flags.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(m * model_ch))]
                ch = int(m * model_ch)
                if rate in rates:
                    layers.append(attn(ch, heads_up))
                if level and i == flags.num_res_blocks:
                    up = res(ch, ch, up=True) if flags.resblock_updown else Upsample(ch, use_conv=True)
                    layers.append(up)
                    rate //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._block_layout.append((ch, int(math.log2(rate))))

        out_ch = 6 if flags.learn_sigma else 3  # eps, plus the variance interpolation v with learn_sigma
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), _zeroed(nn.Conv2d(int(mult[0] * model_ch), out_ch, 3, padding=1)))
        self.num_output_blocks = len(self.output_blocks)
        self._levels = len(mult)

    # ---- shapes -----------------------------------------------------------------------------------
    def block_shapes(self, image_size: int | None = None) -> list[tuple[int, int]]:
        """(channels, H=W) of every decoder block output for a square input, computed without a forward.

        Example:
            >>> ADMUNet(ADMFlags(image_size=32, num_channels=32, channel_mult="1,1", attention_resolutions="")).block_shapes()
            [(32, 16), (32, 16), (32, 32), (32, 32), (32, 32), (32, 32)]
        """
        size = self.flags.image_size if image_size is None else image_size
        if size % 2 ** (self._levels - 1):
            raise BenchError(f"image size {size} is not divisible by {2 ** (self._levels - 1)} ({self._levels} resolution levels)")
        return [(ch, size // 2**log_rate) for ch, log_rate in self._block_layout]

    # ---- fp16 ---------------------------------------------------------------------------------------
    def convert_to_fp16(self) -> None:
        """The official fp16 rule: conv weights/biases of input, middle and output blocks become float16.

        Time embedding, label embedding, the ``out`` head, every GroupNorm and every Linear stay float32.

        Example:
            >>> net = ADMUNet(ADMFlags(image_size=32, num_channels=32, channel_mult="1,1", attention_resolutions=""))
            >>> net.convert_to_fp16(); net.input_blocks[0][0].weight.dtype, net.out[2].weight.dtype
            (torch.float16, torch.float32)
        """
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in part.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                    module.weight.data = module.weight.data.half()
                    if module.bias is not None:
                        module.bias.data = module.bias.data.half()

    @property
    def torso_dtype(self) -> torch.dtype:
        """float16 after ``convert_to_fp16``, else the parameters' dtype; the encoder input is cast to it.

        Example:
            >>> ADMUNet(ADMFlags(image_size=32, num_channels=32, channel_mult="1,1")).torso_dtype
            torch.float32
        """
        return self.input_blocks[0][0].weight.dtype

    # ---- forward ------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor, timesteps: torch.Tensor | int, y: torch.Tensor | None) -> torch.Tensor:
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=x.device)
        if timesteps.dim() != 1 or timesteps.shape[0] not in (1, x.shape[0]):
            raise BenchError(f"timesteps must have shape [1] or [{x.shape[0]}], got {list(timesteps.shape)}")
        # A [1] embedding broadcasts over the batch inside the ResBlocks, like the reference extractor.
        emb = self.time_embed(timestep_embedding(timesteps, self.flags.num_channels))
        if self.flags.class_cond:
            if y is None or y.shape != (x.shape[0],):
                raise BenchError(f"class_cond model needs labels y of shape [{x.shape[0]}], got {None if y is None else list(y.shape)}")
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise BenchError("labels y were given but the model is not class-conditional (class_cond=False)")
        return emb

    def _decoder_outputs(self, x: torch.Tensor, emb: torch.Tensor) -> Iterator[torch.Tensor]:
        # Yields the output of each decoder block in order; a consumer that stops early skips the rest.
        h, skips = x.to(self.torso_dtype), []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            yield h

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | int, y: torch.Tensor | None = None) -> torch.Tensor:
        """Full model output [B, 3 or 6, H, W] in x's dtype (the head runs in float32 for an fp32 input).

        Example:
            >>> net = ADMUNet(ADMFlags(image_size=32, num_channels=32, channel_mult="1,1", learn_sigma=True))
            >>> net(torch.zeros(2, 3, 32, 32), torch.tensor([3, 7])).shape
            torch.Size([2, 6, 32, 32])
        """
        emb = self._embed(x, timesteps, y)
        h = x
        for h in self._decoder_outputs(x, emb):
            pass
        return self.out(h.to(x.dtype))

    def forward_blocks(self, x: torch.Tensor, timesteps: torch.Tensor | int, blocks: Sequence[int],
                       y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Outputs of ``output_blocks[i]`` for i in sorted(blocks) (torso dtype); stops after the deepest one.

        Example:
            >>> import torch
            >>> net = ADMUNet(ADMFlags(image_size=32, num_channels=32, channel_mult="1,1", attention_resolutions=""))
            >>> net.forward_blocks(torch.zeros(1, 3, 32, 32), torch.tensor([0]), [6])
            Traceback (most recent call last):
            bench.errors.BenchError: decoder block 6 is out of range; valid blocks are 0..5
        """
        wanted = sorted({_block_index(b, self.num_output_blocks) for b in blocks})
        if not wanted:
            raise BenchError("forward_blocks needs at least one decoder block index")
        emb = self._embed(x, timesteps, y)
        outputs = []
        for index, h in enumerate(self._decoder_outputs(x, emb)):
            if index in wanted:
                outputs.append(h)
            if index == wanted[-1]:
                break
        return outputs
