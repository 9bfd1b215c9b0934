"""The model `prunery demo` exports and prunes: a small ResNet for 3x32x32 images (BasicBlocks 2/2/2, widths
16/32/64, stride-2 1x1-conv downsample shortcuts, 10 classes, 175,258 parameters), with random weights.

The package's only model: the test and benchmark models are in the repository's `tests/zoo.py`, where this one is
the entry "resnet_basic". Both build the same module (same layers, names and seed), so the demo's output is the
same whichever built it. Batch norms get random affine parameters and running statistics: an identity batch norm
would hide pruning bugs.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NAME", "build", "example_inputs", "export"]

NAME = "resnet_basic"
NUM_CLASSES = 10


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn + shortcut, relu. The block's output channels are tied to the shortcut (identity:
    to the block input; downsample: to its 1x1 conv + BN); the inner width is free."""

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem (conv3x3-bn-relu), stages of BasicBlocks (the first block of every stage but the first has stride 2),
    global average pool, Linear classifier."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2), widths: tuple[int, ...] = (16, 32, 64),
                 stem_width: int = 16, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 3, padding=1, bias=False), nn.BatchNorm2d(stem_width),
                                  nn.ReLU(inplace=True))
        cin = stem_width
        stages = []
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def _randomise_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # affine, with running statistics (the defaults)
                assert m.bias is not None and m.running_mean is not None and m.running_var is not None
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_().mul_(0.1)
                m.running_mean.normal_().mul_(0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def example_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    """A batch of random images (its own generator: the global RNG is neither used nor disturbed)."""
    g = torch.Generator().manual_seed(1234)
    return (torch.randn(batch, 3, 32, 32, generator=g),)


def build(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model in eval mode, built after `torch.manual_seed(seed)`, and example inputs of batch size 2."""
    torch.manual_seed(seed)
    return _randomise_norms(ResNet()).eval(), example_inputs(2)


def export(seed: int = 0) -> torch.export.ExportedProgram:
    """The `torch.export` program of `build(seed)`'s model, its batch dim dynamic (1 to 1024)."""
    model, inputs = build(seed)
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(model, inputs, dynamic_shapes=({0: batch},))
