"""torchvision's ImageNet ResNets (He et al. 2016, Table 1) without torchvision.

The modules, their attribute names (``conv1``, ``bn1``, ``layer1`` … ``layer4``, ``fc``,
``downsample``), the in-place ReLUs and the initialisation are torchvision's
(``torchvision/models/resnet.py``), so a ``state_dict`` of ``torchvision.models.resnet34()``
loads into :func:`resnet34` and back. ``channels`` (64) narrows every stage for tests.
The imagenet-grad-noise seed trains ResNet-34 and ResNet-101.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lscape.options import Option

__all__ = ["BasicBlock", "Bottleneck", "ImageNetResNet", "resnet18", "resnet34", "resnet50", "resnet101"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's V1.5 bottleneck: the stride sits in the 3×3 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ImageNetResNet(nn.Module):
    """torchvision's ``ResNet``: 7×7/2 conv, BN, ReLU, 3×3/2 max-pool, four stages (stride 2
    from the second), global average pooling, a linear classifier."""

    def __init__(self, block: type, layers: Sequence[int], num_classes: int = 1000, channels: int = 64,
                 in_channels: int = 3, zero_init_residual: bool = False):
        super().__init__()
        self.inplanes = channels
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, channels, layers[0])
        self.layer2 = self._make_layer(block, channels * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, channels * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, channels * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build(name: str, block: type, layers: Sequence[int], num_classes: Any, channels: Any,
           zero_init_residual: Any, input_shape: Sequence[int] | None) -> ImageNetResNet:
    num_classes = Option("num_classes", int, minimum=1).parse(num_classes, name)
    channels = Option("channels", int, minimum=1).parse(channels, name)
    zero = Option("zero_init_residual", bool).parse(zero_init_residual, name)
    in_channels = int(input_shape[0]) if input_shape and len(input_shape) == 3 else 3
    return ImageNetResNet(block, layers, num_classes, channels, in_channels, zero)


def resnet18(num_classes: Any = 1000, channels: Any = 64, zero_init_residual: Any = False,
             input_shape: Sequence[int] | None = None) -> ImageNetResNet:
    """torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2]; 11,689,512 parameters at 1000 classes)."""
    return _build("resnet18", BasicBlock, (2, 2, 2, 2), num_classes, channels, zero_init_residual, input_shape)


def resnet34(num_classes: Any = 1000, channels: Any = 64, zero_init_residual: Any = False,
             input_shape: Sequence[int] | None = None) -> ImageNetResNet:
    """torchvision's ResNet-34 (BasicBlock, [3, 4, 6, 3]; 21,797,672 parameters at 1000 classes)."""
    return _build("resnet34", BasicBlock, (3, 4, 6, 3), num_classes, channels, zero_init_residual, input_shape)


def resnet50(num_classes: Any = 1000, channels: Any = 64, zero_init_residual: Any = False,
             input_shape: Sequence[int] | None = None) -> ImageNetResNet:
    """torchvision's ResNet-50 (Bottleneck V1.5, [3, 4, 6, 3]; 25,557,032 parameters)."""
    return _build("resnet50", Bottleneck, (3, 4, 6, 3), num_classes, channels, zero_init_residual, input_shape)


def resnet101(num_classes: Any = 1000, channels: Any = 64, zero_init_residual: Any = False,
              input_shape: Sequence[int] | None = None) -> ImageNetResNet:
    """torchvision's ResNet-101 (Bottleneck V1.5, [3, 4, 23, 3]; 44,549,160 parameters)."""
    return _build("resnet101", Bottleneck, (3, 4, 23, 3), num_classes, channels, zero_init_residual, input_shape)
