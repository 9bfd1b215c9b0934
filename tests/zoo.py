"""In-repo model zoo used by the tests and the benchmarks (`tests/zoo.py`, imported as ``tests.zoo``; it is not
part of the installed package: `prunery demo` has its own model, `prunery/demo_model.py`).

Every architecture here is written from scratch for Prunery (nothing is copied from torchvision).
Each model class's docstring names the dependency ("coupling") pattern it exercises for the pruner.

* ``ZOO`` holds small, fast models (a few thousand to a few hundred thousand parameters, inputs such
  as 3x32x32) for unit tests.
* ``BENCH_ZOO`` holds full-size ImageNet models (ResNet-50 and DenseNet-121 layouts at 224x224).

All models are returned in eval mode. Normalisation layers have randomised affine parameters and
running statistics so that they are never the identity (an identity BatchNorm hides pruning bugs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BENCH_ZOO", "ZOO", "ZooModel", "build", "export"]


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry.

    ``build`` is deterministic given ``torch.manual_seed`` set by the caller and returns the model in
    eval mode. ``example_inputs(batch)`` returns a tuple of inputs with the given batch size; it uses a
    private generator, so it neither depends on nor disturbs the global RNG. ``normalised`` is True if
    some normalisation (LayerNorm/GroupNorm) mixes several channels; per-channel norms (BatchNorm in
    eval, InstanceNorm) do not count.
    """

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[int], tuple[torch.Tensor, ...]]
    normalised: bool
    description: str


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Give every normalisation layer non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm):
                weight = getattr(m, "weight", None)
                bias = getattr(m, "bias", None)
                if weight is not None:
                    weight.uniform_(0.5, 1.5)
                if bias is not None:
                    bias.normal_().mul_(0.1)
                running_mean = getattr(m, "running_mean", None)
                running_var = getattr(m, "running_var", None)
                if running_mean is not None:
                    running_mean.normal_().mul_(0.1)
                if running_var is not None:
                    running_var.uniform_(0.5, 1.5)
    return model


def _conv_bn_act(
    cin: int,
    cout: int,
    k: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def _param(*shape: int) -> nn.Parameter:
    fan_in = shape[-1]
    return nn.Parameter(torch.randn(*shape) / fan_in**0.5)


# --------------------------------------------------------------------------------------------------
# VGG
# --------------------------------------------------------------------------------------------------


class VGG(nn.Module):
    """Plain conv-bn-relu chain with max-pools and a flatten-into-Linear head.

    Couplings: conv out-channels <-> BN <-> next conv in-channels (a simple chain), and the flatten of a
    C x 4 x 4 map into ``Linear(C * 16, ...)``: each conv channel owns 16 consecutive Linear input
    columns. Then Linear -> ReLU -> Linear (hidden width coupling).
    """

    def __init__(
        self, cfg: tuple[int | str, ...] = (16, 16, "M", 32, 32, "M", 64, "M"), num_classes: int = 10
    ):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(cin * 4 * 4, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------------------------------
# ResNets (basic, bottleneck, squeeze-excitation)
# --------------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """Squeeze-excitation gate: global avg pool -> reduce -> ReLU -> expand -> sigmoid -> x * s.

    Couplings: the reduce layer's input and the expand layer's output are tied to the gated feature
    channels (the broadcast multiply ``x * s`` joins them); the hidden width is free.
    ``use_conv`` selects 1x1 convs instead of Linear layers.
    """

    def __init__(self, channels: int, reduction: int = 4, use_conv: bool = False):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.use_conv = use_conv
        if use_conv:
            self.reduce: nn.Module = nn.Conv2d(channels, hidden, 1)
            self.expand: nn.Module = nn.Conv2d(hidden, channels, 1)
        else:
            self.reduce = nn.Linear(channels, hidden)
            self.expand = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        if not self.use_conv:
            s = s.flatten(1)
        s = torch.sigmoid(self.expand(F.relu(self.reduce(s))))
        if not self.use_conv:
            s = s.view(x.shape[0], -1, 1, 1)
        return x * s


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn (+ optional SE) + shortcut, relu.

    Couplings: the block output channels are tied to the shortcut (identity: to the block input and so
    to every block of the stage; downsample: to the 1x1 conv + BN). The inner width is free.
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, se: str | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.se = None if se is None else SqueezeExcite(planes, use_conv=(se == "conv"))
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce - 3x3 (stride here) - 1x1 expand (x4) + shortcut, relu.

    Couplings: as BasicBlock, but with two free inner widths; the output (planes * 4) is tied to the
    residual stream of the stage.
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Generic ResNet: stem, stages of residual blocks (first block of stages > 0 has stride 2), global
    average pool, Linear classifier.

    Couplings: residual-stream channel groups per stage (all identity-shortcut block outputs are tied
    together), stride-2 downsample shortcuts (1x1 conv + BN) that start a new group, free inner widths.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        widths: tuple[int, ...],
        stem_width: int,
        num_classes: int = 10,
        imagenet_stem: bool = False,
        se: tuple[str | None, ...] | None = None,
    ):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem_width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = _conv_bn_act(3, stem_width, 3)
        cin = stem_width
        stages = []
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                if se is not None:
                    blocks.append(BasicBlock(cin, w, stride, se=se[i]))
                else:
                    blocks.append(block(cin, w, stride))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


# --------------------------------------------------------------------------------------------------
# DenseNet
# --------------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 over ``torch.cat`` of all previous features of the block."""

    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, n: int, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, bn_size) for i in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.AvgPool2d(2, 2),
        )


class DenseNet(nn.Module):
    """DenseNet: dense blocks (every layer consumes the concatenation of all earlier features) joined by
    transition layers (BN-ReLU-1x1 conv-avgpool), final BN-ReLU-pool-Linear.

    Couplings: ``torch.cat`` of many producers, so one producer's channels map to a slice of the input
    channels of *every* later layer of the block (and of the BN that precedes each consumer, which
    normalises the concatenation); channel offsets must be tracked through nested concatenations.
    """

    def __init__(
        self,
        blocks: tuple[int, ...],
        growth: int,
        init_features: int,
        bn_size: int = 4,
        compression: float = 0.5,
        num_classes: int = 10,
        imagenet_stem: bool = False,
    ):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, init_features, 7, 2, 3, bias=False),
                nn.BatchNorm2d(init_features),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = _conv_bn_act(3, init_features, 3)
        feats: list[nn.Module] = []
        c = init_features
        for i, n in enumerate(blocks):
            feats.append(DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(blocks) - 1:
                cout = int(c * compression)
                feats.append(Transition(c, cout))
                c = cout
        feats += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------------
# Inception
# --------------------------------------------------------------------------------------------------


class InceptionBlock(nn.Module):
    """Four branches (1x1; 1x1->3x3; 1x1->5x5 or 1x1->3x3->3x3; maxpool->1x1) concatenated on dim 1."""

    def __init__(
        self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool_proj: int, double3x3: bool
    ):
        super().__init__()
        self.branch1 = _conv_bn_act(cin, c1, 1)
        self.branch2 = nn.Sequential(_conv_bn_act(cin, c3r, 1), _conv_bn_act(c3r, c3, 3))
        if double3x3:
            self.branch3 = nn.Sequential(
                _conv_bn_act(cin, c5r, 1), _conv_bn_act(c5r, c5, 3), _conv_bn_act(c5, c5, 3)
            )
        else:
            self.branch3 = nn.Sequential(_conv_bn_act(cin, c5r, 1), _conv_bn_act(c5r, c5, 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn_act(cin, pool_proj, 1))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionNet(nn.Module):
    """Stem + two Inception blocks (5x5 variant, then double-3x3 variant) + pool + Linear.

    Couplings: one input fans out to four branches (the block input channels are tied to the input
    channels of four 1x1 convs, one behind a channel-preserving max-pool), and the four branch outputs
    are concatenated, so each branch's last conv maps to a slice of the next block's inputs.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn_act(3, 32, 3)
        self.block1 = InceptionBlock(32, 16, 16, 24, 8, 12, 12, double3x3=False)
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = InceptionBlock(self.block1.out_channels, 24, 24, 32, 12, 16, 16, double3x3=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.block2.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.block1(self.stem(x)))
        x = self.block2(x)
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """Expand 1x1 - depthwise 3x3 (groups = channels) - project 1x1 (linear), residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (inverted residuals, ReLU6).

    Couplings: a depthwise conv ties its input and output channels one-to-one (so the expand conv's
    outputs, the depthwise conv and the project conv's inputs form one group); residual streams tie the
    project outputs of consecutive same-shape blocks.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2)]  # (t, c, n, s)
        layers: list[nn.Module] = [_conv_bn_act(3, 16, 3, act=nn.ReLU6)]
        cin = 16
        for t, c, n, s in settings:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_act(cin, 64, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------------
# ShuffleNetV2
# --------------------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit.

    stride 1: ``x.chunk(2, dim=1)``, the second half goes through 1x1 - dw3x3 - 1x1, ``torch.cat`` with
    the untouched first half, channel shuffle. stride 2: two branches (dw3x3 s2 - 1x1; 1x1 - dw3x3 s2 -
    1x1) on the full input, ``torch.cat``, channel shuffle.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        bf = cout // 2
        self.stride = stride
        if stride > 1:
            self.branch1: nn.Module | None = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, bf, 1, bias=False),
                nn.BatchNorm2d(bf),
                nn.ReLU(inplace=True),
            )
            b2_in = cin
        else:
            assert cin == 2 * bf
            self.branch1 = None
            b2_in = bf
        self.branch2 = nn.Sequential(
            nn.Conv2d(b2_in, bf, 1, bias=False),
            nn.BatchNorm2d(bf),
            nn.ReLU(inplace=True),
            nn.Conv2d(bf, bf, 3, stride, 1, groups=bf, bias=False),
            nn.BatchNorm2d(bf),
            nn.Conv2d(bf, bf, 1, bias=False),
            nn.BatchNorm2d(bf),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 (two stages, each a stride-2 unit followed by a stride-1 unit).

    Couplings: channel split (chunk) and concat create slices, and the channel shuffle
    (view/transpose/reshape) permutes channels by interleaving, so a channel of one unit's output maps to
    a *non-contiguous* index set of the next unit's input. The pass-through half of a stride-1 unit ties
    channels across units.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn_act(3, 24, 3)
        units: list[nn.Module] = []
        cin = 24
        for cout in (48, 96):
            units += [ShuffleUnit(cin, cout, 2), ShuffleUnit(cout, cout, 1)]
            cin = cout
        self.units = nn.Sequential(*units)
        self.conv5 = _conv_bn_act(cin, 128, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.units(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------------
# SqueezeNet
# --------------------------------------------------------------------------------------------------


class Fire(nn.Module):
    """Squeeze 1x1 then expand 1x1 and expand 3x3 concatenated on dim 1."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.out_channels = e1 + e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet (no BatchNorm, conv biases everywhere).

    Couplings: the squeeze output fans out to two expand convs whose outputs are concatenated; the
    classifier is a final 1x1 conv to 10 channels + adaptive avg pool + flatten (no Linear), so the last
    conv's output channels are the (unprunable) class logits.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            Fire(32, 8, 16, 16),
            Fire(32, 8, 16, 16),
            nn.MaxPool2d(2),
            Fire(32, 12, 24, 24),
            Fire(48, 12, 24, 24),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Conv2d(48, num_classes, 1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------------


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn_act(cin, cout, 3), _conv_bn_act(cout, cout, 3))


class UNet(nn.Module):
    """Small UNet with two down levels, ConvTranspose2d upsampling, ``torch.cat([up, skip], 1)`` skips
    and a 1x1 conv head to 2 channels at full resolution (output B x 2 x H x W).

    Couplings: ConvTranspose2d (weight layout is (in, out, kH, kW), i.e. transposed w.r.t. Conv2d); an
    encoder output feeds both the next level and, via concat, a decoder conv (offset = up channels).
    """

    def __init__(self, cin: int = 3, out_channels: int = 2):
        super().__init__()
        self.enc1 = _double_conv(cin, 16)
        self.enc2 = _double_conv(16, 32)
        self.bottom = _double_conv(32, 64)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec2 = _double_conv(64, 32)
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec1 = _double_conv(32, 16)
        self.head = nn.Conv2d(16, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(F.max_pool2d(s1, 2))
        b = self.bottom(F.max_pool2d(s2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), s2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], 1))
        return self.head(d1)


# --------------------------------------------------------------------------------------------------
# 1-D and 3-D convs
# --------------------------------------------------------------------------------------------------


class ResBlock1d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class Conv1dNet(nn.Module):
    """1-D conv net over (B, 4, 64) sequences: Conv1d/BatchNorm1d/ReLU, an identity residual block, a
    stride-2 residual block with a 1x1 Conv1d shortcut, global average pool, Linear.

    Couplings: same as a ResNet, but with 3-D activations and Conv1d/BatchNorm1d weight layouts.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(4, 16, 5, padding=2, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        self.block1 = ResBlock1d(16, 16)
        self.block2 = ResBlock1d(16, 32, 2)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Conv3dNet(nn.Module):
    """3-D conv net over (B, 2, 8, 16, 16): Conv3d/BatchNorm3d/ReLU with max-pools, then an adaptive
    average pool to (1, 2, 2) and a flatten into ``Linear(C * 4, 10)``.

    Couplings: Conv3d (5-D weights) chain, and a flatten-into-Linear where every channel owns 4
    consecutive Linear input columns.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def cbr(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv3d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *cbr(2, 8),
            nn.MaxPool3d(2),
            *cbr(8, 16),
            nn.MaxPool3d(2),
            *cbr(16, 32),
            nn.AdaptiveAvgPool3d((1, 2, 2)),
        )
        self.fc = nn.Linear(32 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


# --------------------------------------------------------------------------------------------------
# grouped convs + single-channel spatial attention
# --------------------------------------------------------------------------------------------------


class ResNeXtBlock(nn.Module):
    """1x1 - grouped 3x3 (groups < channels) - 1x1 + identity shortcut."""

    def __init__(self, channels: int, width: int, groups: int):
        super().__init__()
        self.conv1 = _conv_bn_act(channels, width, 1)
        self.conv2 = _conv_bn_act(width, width, 3, groups=groups)
        self.conv3 = _conv_bn_act(width, channels, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv3(self.conv2(self.conv1(x))))


class SpatialAttention(nn.Module):
    """A conv with ONE output channel, sigmoid, multiplied (broadcast over channels) into the features."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class GroupedNet(nn.Module):
    """Grouped convs where groups != channels, plus a single-output-channel spatial attention conv.

    Couplings: a grouped conv (groups=4 on 32 channels, and a 32 -> 64 groups=4 conv whose in/out
    channel counts differ) ties pruning within a group: input and output channels must be removed
    group-consistently (same count per group), it is *not* depthwise. The attention conv has one output
    channel (must never be pruned; it broadcasts over all channels in ``x * a``, so it creates no
    channel coupling) and its input channels are tied to the attended features.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn_act(3, 32, 3)
        self.block1 = ResNeXtBlock(32, 32, groups=4)
        self.expand = _conv_bn_act(32, 64, 3, stride=2, groups=4)
        self.attn = SpatialAttention(64)
        self.block2 = ResNeXtBlock(64, 64, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))
        x = self.attn(self.expand(x))
        x = self.block2(x)
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------------
# GroupNorm / InstanceNorm
# --------------------------------------------------------------------------------------------------


class GroupNormNet(nn.Module):
    """Conv stack with GroupNorm (normalises across the channels of a group) and an affine
    InstanceNorm2d (per-channel), plus a residual around a GroupNorm'd conv.

    Couplings: GroupNorm ties the channel count to ``num_groups`` (pruning must keep C divisible by the
    group count, remove channels evenly per group) and its statistics mix channels, so pruning changes
    the other channels' outputs (normalised=True). InstanceNorm2d(affine=True) is a per-channel
    affine like BatchNorm, but with no running statistics.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, 32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.in2 = nn.InstanceNorm2d(32, affine=True)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.gn3 = nn.GroupNorm(4, 64)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.gn4 = nn.GroupNorm(4, 64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.in2(self.conv2(x)))
        x = F.relu(self.gn3(self.conv3(x)))
        x = F.relu(x + self.gn4(self.conv4(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------------
# functional ops
# --------------------------------------------------------------------------------------------------


class FunctionalNet(nn.Module):
    """A model using functional ops mid-network, on (B, 3, 16, 16) images.

    conv-bn-relu -> ``h[:, :, 2:10]`` (slice on the non-channel H dim) -> flatten(2).transpose(1, 2)
    into (B, N, C) tokens -> ``F.linear(t, self.w, self.b)`` with bare Parameters -> attention-like
    ``torch.matmul`` between two activations (q @ k^T, then attn @ t) -> ``torch.cat`` on dim 2 of a
    3-D tensor -> ``split`` on dim 2 -> gated product -> mean over tokens -> Linear(16, 10).

    Couplings: functional weights (not nn.Linear) whose out dim (dim 0) and in dim (dim 1) are tied to
    token-feature channels; a matmul contracting q and k features ties ``wq``'s and ``wk``'s output
    rows together; ``attn @ t`` keeps t's feature channels; cat/split on the last dim create slices;
    the spatial slice must *not* be mistaken for a channel slice.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn_act(3, 16, 3)
        self.w = _param(32, 16)
        self.b = nn.Parameter(torch.randn(32) * 0.1)
        self.wq = _param(16, 32)
        self.wk = _param(16, 32)
        self.wa = _param(16, 48)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)[:, :, 2:10]  # (B, 16, 8, 16)
        t = h.flatten(2).transpose(1, 2)  # (B, 128, 16)
        t = F.relu(F.linear(t, self.w, self.b))  # (B, 128, 32)
        q = F.linear(t, self.wq)
        k = F.linear(t, self.wk)
        attn = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * 0.25, dim=-1)  # (B, 128, 128)
        ctx = torch.matmul(attn, t)  # (B, 128, 32)
        z = torch.cat([ctx, t], dim=2)  # (B, 128, 64)
        a, g = z.split([48, 16], dim=2)
        y = F.linear(a, self.wa) * torch.sigmoid(g)  # (B, 128, 16)
        return self.fc(y.mean(dim=1))


# --------------------------------------------------------------------------------------------------
# MLPs
# --------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Linear/LayerNorm/ReLU/Dropout MLP over (B, 64) float features.

    Couplings: Linear out-features <-> LayerNorm (normalises over all features: normalised=True) <->
    next Linear in-features.
    """

    def __init__(self, cin: int = 64, hidden: tuple[int, ...] = (128, 64), num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = cin
        for h in hidden:
            layers += [nn.Linear(c, h), nn.LayerNorm(h), nn.ReLU(inplace=True), nn.Dropout(0.1)]
            c = h
        layers.append(nn.Linear(c, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EmbeddingMLP(nn.Module):
    """nn.Embedding(100, 32) over int64 tokens (B, 12) -> mean over tokens -> MLP -> 10.

    Couplings: the embedding dim (dim 1 of the Embedding weight) is tied to the first Linear's input
    features; the integer input has no channel dim.
    """

    def __init__(self, vocab: int = 100, dim: int = 32, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(tokens).mean(dim=1))


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


def _builder(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build_model() -> nn.Module:
        return _randomise_norms(factory()).eval()

    return build_model


def _float_inputs(*shape: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    def example_inputs(batch: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(1234)
        return (torch.randn(batch, *shape, generator=g),)

    return example_inputs


def _token_inputs(vocab: int, length: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    def example_inputs(batch: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(1234)
        return (torch.randint(0, vocab, (batch, length), generator=g, dtype=torch.int64),)

    return example_inputs


def _entry(
    name: str,
    factory: Callable[[], nn.Module],
    inputs: Callable[[int], tuple[torch.Tensor, ...]],
    normalised: bool,
    description: str,
) -> ZooModel:
    return ZooModel(name, _builder(factory), inputs, normalised, description)


_IMG = _float_inputs(3, 32, 32)

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        _entry("vgg", VGG, _IMG, False, "VGG-style conv-bn-relu chain, flatten(64x4x4) into Linear head"),
        _entry(
            "resnet_basic",
            lambda: ResNet(BasicBlock, (2, 2, 2), (16, 32, 64), stem_width=16),
            _IMG,
            False,
            "ResNet, BasicBlocks 2/2/2, widths 16/32/64, stride-2 1x1-conv downsample shortcuts",
        ),
        _entry(
            "resnet_bottleneck",
            lambda: ResNet(Bottleneck, (2, 1, 1), (8, 16, 32), stem_width=16),
            _IMG,
            False,
            "ResNet, Bottleneck blocks (expansion 4) 2/1/1, outputs 32/64/128, downsample shortcuts",
        ),
        _entry(
            "densenet",
            lambda: DenseNet((3, 3, 3), growth=12, init_features=24),
            _IMG,
            False,
            "DenseNet, 3 dense blocks of 3 layers, growth 12, bn_size 4, transitions with compression 0.5",
        ),
        _entry("inception", InceptionNet, _IMG, False, "Two 4-branch Inception blocks (5x5 and double-3x3)"),
        _entry("mobilenetv2", MobileNetV2, _IMG, False, "MobileNetV2 inverted residuals, depthwise, ReLU6"),
        _entry(
            "shufflenetv2",
            ShuffleNetV2,
            _IMG,
            False,
            "ShuffleNetV2 units: chunk split, depthwise branches, cat, channel shuffle; stride-2 units",
        ),
        _entry(
            "squeezenet", SqueezeNet, _IMG, False, "SqueezeNet fire modules, 1x1-conv classifier, no Linear"
        ),
        _entry("unet", UNet, _IMG, False, "UNet, 2 levels, ConvTranspose2d, cat skips, B x 2 x H x W output"),
        _entry(
            "se_resnet",
            lambda: ResNet(
                BasicBlock, (1, 1, 1), (16, 32, 64), stem_width=16, se=("conv", "linear", "linear")
            ),
            _IMG,
            False,
            "ResNet BasicBlocks with squeeze-excitation (1x1-conv SE in stage 1, Linear SE after)",
        ),
        _entry(
            "conv1d", Conv1dNet, _float_inputs(4, 64), False, "Conv1d/BatchNorm1d residual net on (B, 4, 64)"
        ),
        _entry(
            "conv3d",
            Conv3dNet,
            _float_inputs(2, 8, 16, 16),
            False,
            "Conv3d/BatchNorm3d net on (B, 2, 8, 16, 16), flatten(32x1x2x2) into Linear",
        ),
        _entry(
            "grouped",
            GroupedNet,
            _IMG,
            False,
            "ResNeXt-like grouped convs (groups 4/8, not depthwise) + 1-channel spatial attention conv",
        ),
        _entry(
            "groupnorm",
            GroupNormNet,
            _IMG,
            True,
            "Conv stack with GroupNorm (8 and 4 groups) and an affine InstanceNorm2d",
        ),
        _entry(
            "functional",
            FunctionalNet,
            _float_inputs(3, 16, 16),
            False,
            "F.linear on tokens, matmul of activations, cat/split on dim 2, slice on H",
        ),
        _entry("mlp", MLP, _float_inputs(64), True, "Linear/LayerNorm/ReLU/Dropout MLP on (B, 64)"),
        _entry(
            "embedding_mlp",
            EmbeddingMLP,
            _token_inputs(100, 12),
            False,
            "Embedding(100, 32) over int64 tokens (B, 12), mean over tokens, MLP",
        ),
    ]
}

_IMAGENET = _float_inputs(3, 224, 224)

BENCH_ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        _entry(
            "resnet50",
            lambda: ResNet(
                Bottleneck,
                (3, 4, 6, 3),
                (64, 128, 256, 512),
                stem_width=64,
                num_classes=1000,
                imagenet_stem=True,
            ),
            _IMAGENET,
            False,
            "ImageNet ResNet-50 (bottleneck 3/4/6/3, stride on the 3x3), ~25.56M params, 224x224",
        ),
        _entry(
            "densenet121",
            lambda: DenseNet(
                (6, 12, 24, 16), growth=32, init_features=64, num_classes=1000, imagenet_stem=True
            ),
            _IMAGENET,
            False,
            "ImageNet DenseNet-121 (growth 32, blocks 6/12/24/16, bn_size 4), ~7.98M params, 224x224",
        ),
    ]
}


def _lookup(name: str) -> ZooModel:
    if name in ZOO:
        return ZOO[name]
    if name in BENCH_ZOO:
        return BENCH_ZOO[name]
    raise KeyError(f"unknown zoo model {name!r}; known: {sorted(ZOO) + sorted(BENCH_ZOO)}")


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build zoo model ``name`` (ZOO or BENCH_ZOO) with ``torch.manual_seed(seed)``; return the model in
    eval mode and example inputs with batch size 2."""
    entry = _lookup(name)
    torch.manual_seed(seed)
    model = entry.build().eval()
    return model, entry.example_inputs(2)


def export(name: str, seed: int = 0, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.export`` zoo model ``name``; with ``dynamic_batch`` dim 0 of every input is the
    dynamic dimension ``torch.export.Dim("batch", min=1, max=1024)``."""
    model, inputs = build(name, seed)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes)
