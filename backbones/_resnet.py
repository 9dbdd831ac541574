"""The ResNet-50 family used by SwAV, written from its published description (He et al., 2016).

Module and parameter names follow torchvision's layout (``conv1``, ``bn1``, ``layer1.0.conv2``,
``layer1.0.downsample.0``, ...), which is also what SwAV's checkpoints use, so the official state dicts
load key for key. There is no classifier: SwAV replaces it by the identity.

``base`` is the stem width: 64 gives ResNet-50, 128 gives SwAV's ResNet-50w2. SwAV widens *every*
layer (stage outputs 512/1024/2048/4096), unlike torchvision's ``wide_resnet50_2``, which only widens
the 3x3 bottleneck convolutions and keeps 256..2048 outputs.

Example:
    >>> net = ResNet50(base=8)
    >>> [name for name, _ in net.named_children()][:4]
    ['conv1', 'bn1', 'relu', 'maxpool']
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

#: blocks per stage of ResNet-50
DEPTHS = (3, 4, 6, 3)
#: the bottleneck's output has ``EXPANSION`` times the channels of its 3x3 convolution
EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride, "ResNet v1.5") -> 1x1 expand, plus the shortcut.

    Example:
        >>> block = Bottleneck(16, 8, stride=2)
        >>> block(torch.zeros(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # A projection shortcut only where the shape changes (first block of a stage).
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet50(nn.Module):
    """ResNet-50 trunk (no pooling head, no classifier) with stem width ``base``.

    ``forward_block_inputs`` returns the tensors that *enter* chosen bottleneck blocks, which is what
    the ddpm-segmentation SwAV extractor captures.

    Example:
        >>> net = ResNet50(base=8).eval()
        >>> maps = net.forward_block_inputs(torch.zeros(1, 3, 64, 64), [(1, 0), (4, 2)])
        >>> [tuple(m.shape) for m in maps]
        [(1, 8, 16, 16), (1, 256, 2, 2)]
    """

    def __init__(self, base: int = 64) -> None:
        super().__init__()
        self.base = base
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = base
        for stage, depth in enumerate(DEPTHS, start=1):
            width = base * 2 ** (stage - 1)
            blocks = []
            for index in range(depth):
                stride = 2 if (index == 0 and stage > 1) else 1
                blocks.append(Bottleneck(in_channels, width, stride))
                in_channels = width * EXPANSION
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self._init_weights()

    def _init_weights(self) -> None:
        # He init for convolutions, identity BatchNorm: the usual ResNet starting point (random controls).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def block_input_channels(self, stage: int, index: int) -> int:
        """Channels entering ``layer{stage}[index]``.

        Example:
            >>> ResNet50().block_input_channels(2, 0), ResNet50().block_input_channels(2, 1)
            (256, 512)
        """
        if index > 0:
            return self.base * 2 ** (stage - 1) * EXPANSION
        return self.base if stage == 1 else self.base * 2 ** (stage - 2) * EXPANSION

    @staticmethod
    def block_input_stride(stage: int, index: int) -> int:
        """Stride (w.r.t. the image) of the tensor entering ``layer{stage}[index]``.

        Example:
            >>> ResNet50.block_input_stride(2, 0), ResNet50.block_input_stride(2, 1)
            (4, 8)
        """
        # layer1 runs at stride 4 (stem conv + max-pool); each later stage halves in its first block.
        stage_stride = 4 * 2 ** (stage - 1)
        return stage_stride if index > 0 else max(4, stage_stride // 2)

    def forward_block_inputs(self, x: torch.Tensor, blocks: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Inputs of ``layer{stage}[index]`` for each ``(stage, index)``, in network order.

        Stops after the last requested block, so later stages cost nothing.
        """
        wanted = set(blocks)
        last = max(wanted)
        out: list[torch.Tensor] = []
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage, depth in enumerate(DEPTHS, start=1):
            layer = getattr(self, f"layer{stage}")
            for index in range(depth):
                if (stage, index) in wanted:
                    out.append(x)
                if (stage, index) == last:
                    return out
                x = layer[index](x)
        return out
