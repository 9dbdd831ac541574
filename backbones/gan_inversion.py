"""``gan_inversion``: StyleGAN2 activations for the image's e4e inversion (Table 2 "GAN Inversion", spec 2.2, D10).

The image is resized to 256, mapped to [-1, 1] and encoded by e4e into W+ codes; the checkpoint's
``latent_avg`` is added (``start_from_latent_avg``); the e4e decoder (rosinality StyleGAN2) then
synthesises with those codes and its STORED noise maps (``randomize_noise=False``: deterministic).
Features (``layers="all"``, default): the 4 x 4 constant and every styled conv output: const, conv1,
then two convs per resolution 8..size. 5888 per pixel with a 256 generator (config-f), 6080 with the
1024 FFHQ model, whose 512 and 1024 maps the pixel sampler reduces bilinearly (no antialias, D16).
``layers="convs"`` drops the constant (5376 at 256); a list of names (``const``, ``conv1``,
``convs.<k>``) picks maps.

Optional (off by default, a harness setting not in the paper): ``refine_steps`` > 0 refines the codes
by Adam (``refine_lr``) on the per-image mean squared error between the decoded image, resized to the
encoder input, and that input; noise stays fixed, so the result stays deterministic.

Strides are measured on the generator's output grid: ``input_size`` is the generator size (1024 for
FFHQ), while the encoder always sees the image at 256.

Example:
    >>> import bench
    >>> bench.create_backbone("gan_inversion.lsun_horse", pretrained=False, device="meta").num_features
    5888
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from backbones._e4e_common import TINY_ARCH, E4EBackbone, e4e_weights
from bench import BenchError, FeatureInfo, register_backbone

if TYPE_CHECKING:  # pragma: no cover
    import torch


def decoder_map_names(size: int) -> list[str]:
    """``const``, ``conv1``, ``convs.0`` ... for a generator of ``size``.

    Example:
        >>> decoder_map_names(16)
        ['const', 'conv1', 'convs.0', 'convs.1', 'convs.2', 'convs.3']
    """
    return ["const", "conv1"] + [f"convs.{k}" for k in range(2 * (size.bit_length() - 1) - 4)]


@register_backbone("gan_inversion", "e4e_inversion")
class GANInversion(E4EBackbone):
    """e4e inversion, then the decoder's constant and styled-conv outputs.

    ``layers``: ``"all"`` (default, D10), ``"convs"`` or a list of names; ``checkpoint``: an e4e/pSp
    ``.pt`` container (architecture from its ``opts``); ``arch``: keys of
    :data:`backbones._e4e_common.E4E_ARCH` for what the file does not store; ``refine_steps`` /
    ``refine_lr``: optional latent refinement (default off).

    Example:
        >>> import bench
        >>> bb = bench.create_backbone("gan_inversion.ffhq", pretrained=False, device="meta")
        >>> bb.num_features, bb.input_size, bb.feature_info[-1]
        (6080, 1024, FeatureInfo(name='convs.15', channels=32, stride=1))
    """

    weights = e4e_weights("GAN Inversion", {
        "ffhq": {"ffhq_34": (51.7, 0.8), "celeba_19": (51.5, 2.3)},
        "lsun_horse": {"horse_21": (17.7, 0.4)},
    })
    tiny = {"pretrained": False, "arch": dict(TINY_ARCH)}

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu",
                 layers: str | Sequence[str] = "all", checkpoint: str | Path | None = None,
                 arch: Mapping[str, Any] | None = None, refine_steps: int = 0, refine_lr: float = 0.01) -> None:
        super().__init__(tag=tag, pretrained=pretrained, device=device)
        if layers not in ("all", "convs"):
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
                raise BenchError(f"{self.name} layers must be 'all', 'convs' or a non-empty list of map names, "
                                 f"got {layers!r}")
            if len(set(layers)) != len(layers):
                raise BenchError(f"{self.name} layers list a map twice: {list(layers)!r}")
        if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
            raise BenchError(f"{self.name} refine_steps must be an integer >= 0, got {refine_steps!r}")
        if isinstance(refine_lr, bool) or not isinstance(refine_lr, (int, float)) or not refine_lr > 0:
            raise BenchError(f"{self.name} refine_lr must be a positive number, got {refine_lr!r}")
        self.refine_steps, self.refine_lr = refine_steps, float(refine_lr)
        self._setup(checkpoint=checkpoint, arch=arch, tag_given=tag is not None, need_decoder=True)
        names = decoder_map_names(self.arch["size"])
        if layers == "all":
            chosen = names
        elif layers == "convs":
            chosen = names[1:]
        else:
            for name in layers:
                if name not in names:
                    raise BenchError(f"{self.name} layer {name!r} is not a map of this {self.arch['size']} px "
                                     f"generator; valid: const, conv1, convs.0..convs.{len(names) - 3}")
            chosen = list(layers)
        self.layers = tuple(chosen)
        self._index = {name: i for i, name in enumerate(names)}

    @property
    def input_size(self) -> int:
        """The generator's output size: the grid the map strides refer to (images of any size are resized
        to ``encoder_size`` for the encoder)."""
        return self.arch["size"]

    @property
    def feature_info(self) -> list[FeatureInfo]:
        res = self.decoder.map_resolutions
        return [FeatureInfo(name, self.decoder.channels[res[self._index[name]]],
                            self.arch["size"] // res[self._index[name]]) for name in self.layers]

    def codes(self, x: "torch.Tensor") -> "torch.Tensor":
        """[-1, 1] encoder input -> the W+ codes the decoder receives ``[B, n_styles, style_dim]``.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("gan_inversion", **GANInversion.tiny)
            >>> bb.codes(torch.zeros(2, 3, 32, 32)).shape
            torch.Size([2, 8, 16])
        """
        import torch

        x = self._encoder_input(x)
        with torch.no_grad():
            codes = self.encoder(x, heads=True)["codes_raw"]
            if self.arch["start_from_latent_avg"]:
                codes = codes + self.latent_avg
        return self._refine(codes, x) if self.refine_steps else codes

    def _refine(self, codes: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        # extract() runs under inference_mode; optimisation needs autograd and ordinary tensors.
        with torch.inference_mode(False), torch.enable_grad():
            target = target.clone()
            w = codes.clone().requires_grad_(True)
            optimiser = torch.optim.Adam([w], lr=self.refine_lr)
            for _ in range(self.refine_steps):
                image, _ = self.decoder(w)
                if image.shape[-2:] != target.shape[-2:]:
                    shrink = image.shape[-1] > target.shape[-1]
                    image = F.interpolate(image, size=target.shape[-2:], mode="bilinear", align_corners=False,
                                          antialias=shrink)
                # Per-image means summed: each image's codes move independently of the batch.
                loss = (image - target).pow(2).mean(dim=(1, 2, 3)).sum()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            return w.detach().clone()

    def forward_features(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """[-1, 1] input at ``encoder_size`` -> the chosen decoder maps at their native resolution.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("gan_inversion", **GANInversion.tiny, layers=["const", "convs.5"])
            >>> [tuple(m.shape) for m in bb.forward_features(torch.zeros(1, 3, 32, 32))]
            [(1, 16, 4, 4), (1, 16, 32, 32)]
        """
        import torch

        codes = self.codes(x)
        with torch.no_grad():
            _, maps = self.decoder(codes)
        return [maps[self._index[name]].contiguous() for name in self.layers]

    def config(self) -> dict[str, Any]:
        """Base config plus architecture, maps, refinement and the noise rule.

        Example:
            >>> import bench
            >>> bench.create_backbone("gan_inversion", **GANInversion.tiny).config()["noise"]
            'stored'
        """
        cfg = super().config()
        cfg.update({"layers": list(self.layers), "refine_steps": self.refine_steps, "refine_lr": self.refine_lr,
                    "noise": "stored"})
        return cfg
