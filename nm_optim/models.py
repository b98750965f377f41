"""A small model zoo for the Neural Mechanics experiments, without torchvision.

    from nm_optim.models import get_model, example_input
    model = get_model("vgg16_bn", num_classes=10, image_size=32)
    syms = nm_optim.find_symmetries(model, example_input(model))

| name | what | symmetries `find_symmetries` finds |
|---|---|---|
| `mlp` | Flatten, Linear-ReLU-Linear-ReLU-Linear | rescale per hidden layer, translation |
| `small_vgg` | 3 convs (ReLU, max-pool), Flatten, 2 Linear; for 8x8 digits | rescale (incl. across Flatten), translation |
| `small_vgg_bn` | the same with BatchNorm after each conv | scale per conv, rescale fc1->fc2, translation |
| `vgg16`, `vgg16_bn` | torchvision's VGG-16 (cfg "D") and VGG-16-BN, same module names | see below |
| `resnet18` | torchvision's ResNet-18 (BasicBlock [2, 2, 2, 2]) | scale per conv, translation |

VGG-16 / VGG-16-BN match torchvision's ``vgg16`` / ``vgg16_bn`` module for module (``features``,
``avgpool = AdaptiveAvgPool2d((7, 7))``, ``classifier``), parameter names and shapes and
initialisation included (138.4M parameters at 1000 classes). ``image_size`` only has to be at
least 32 (five 2x2 max-pools): the adaptive pool keeps the classifier's 512*7*7 inputs whatever the
input size (a 32x32 input reaches it as 1x1 and is replicated to 7x7, as torchvision does);
``pool_size`` changes that, e.g. ``pool_size=1`` gives the common CIFAR variant with a
Linear(512, 4096).

Every model gets ``input_shape`` (C, H, W) so `example_input` can build an input for it, and ends
in logits: the loss, cross-entropy, is outside the model. Each declares that loss as
``model.nm_optim_loss = F.cross_entropy``, which `find_symmetries` reads when it is given no
``loss=``: the translation symmetry of the last Linear holds under a softmax cross-entropy only
(not under MSE, for one), so a model trained with another loss must say so, e.g.
``find_symmetries(model, x, loss=F.mse_loss)``. Build on the meta device to get the structure for
free: ``with torch.device("meta"): get_model("vgg16")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("mlp", "small_vgg", "small_vgg_bn", "vgg16", "vgg16_bn", "resnet18")

VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def get_model(name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """The zoo's model `name` (one of MODELS) for `in_channels` x `image_size` x `image_size` inputs."""
    builders = {
        "mlp": lambda: mlp(num_classes=num_classes, in_channels=in_channels, image_size=image_size),
        "small_vgg": lambda: small_vgg(num_classes=num_classes, in_channels=in_channels, image_size=image_size),
        "small_vgg_bn": lambda: small_vgg(
            num_classes=num_classes, in_channels=in_channels, image_size=image_size, batch_norm=True
        ),
        "vgg16": lambda: vgg16(num_classes=num_classes, in_channels=in_channels, image_size=image_size),
        "vgg16_bn": lambda: vgg16_bn(num_classes=num_classes, in_channels=in_channels, image_size=image_size),
        "resnet18": lambda: resnet18(num_classes=num_classes, in_channels=in_channels, image_size=image_size),
    }
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return builders[name]()


def example_input(model: nn.Module, batch_size: int = 2, *, device=None, dtype=None) -> torch.Tensor:
    """A random input batch of the model's ``input_shape`` (on its parameters' device and dtype
    unless given)."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError(f"{type(model).__name__} has no input_shape; build the example input yourself")
    p = next(model.parameters(), None)
    device = device if device is not None else (p.device if p is not None else None)
    dtype = dtype if dtype is not None else (p.dtype if p is not None else None)
    return torch.randn(batch_size, *shape, device=device, dtype=dtype)


def _classifier(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """What every zoo model carries: its input shape (for example_input) and its training loss,
    cross-entropy on the logits (for find_symmetries' translation symmetry)."""
    model.input_shape = input_shape
    model.nm_optim_loss = F.cross_entropy


def _check_sizes(num_classes: int, in_channels: int, image_size: int, smallest: int) -> None:
    for what, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    if image_size < smallest:
        raise ValueError(f"image_size must be at least {smallest} for this model, got {image_size}")


# -- MLP ------------------------------------------------------------------------------------------
def mlp(
    *, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, hidden: Sequence[int] = (128, 128)
) -> nn.Sequential:
    """Flatten, then Linear-ReLU per hidden width, then a Linear to the logits."""
    _check_sizes(num_classes, in_channels, image_size, 1)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    model = nn.Sequential(*layers)
    _classifier(model, (in_channels, image_size, image_size))
    return model


# -- small VGG-style nets for the demo ---------------------------------------------------------------
class SmallVGG(nn.Module):
    """conv-ReLU, conv-ReLU, max-pool, conv-ReLU, max-pool, Flatten, Linear-ReLU-Linear.

    Sized for scikit-learn's 8x8 digits (1 channel; 16K parameters at the defaults); trains in
    seconds on a CPU. With ``batch_norm`` a BatchNorm2d follows each conv (the convs keep their
    bias, as torchvision's VGG-BN does, so the scale groups include it)."""

    def __init__(
        self, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, batch_norm: bool = False,
        width: int = 16, hidden: int = 64,
    ) -> None:
        super().__init__()
        _check_sizes(num_classes, in_channels, image_size, 4)
        w = width
        layers: list[nn.Module] = []
        for c_in, c_out, pool in ((in_channels, w, False), (w, w, True), (w, 2 * w, True)):
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
            if pool:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Linear(2 * w * side * side, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )
        _classifier(self, (in_channels, image_size, image_size))
        # He initialisation (PyTorch's default shrinks the signal through the ReLU stack, and
        # the net without BatchNorm then barely learns in the demo's few hundred steps).
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def small_vgg(
    *, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, batch_norm: bool = False, width: int = 16,
    hidden: int = 64,
) -> SmallVGG:
    return SmallVGG(num_classes=num_classes, in_channels=in_channels, image_size=image_size, batch_norm=batch_norm,
                    width=width, hidden=hidden)


# -- VGG-16 -------------------------------------------------------------------------------------
class VGG(nn.Module):
    """torchvision's VGG: ``features`` (convs), ``avgpool``, ``classifier`` (3 Linear)."""

    def __init__(
        self, features: nn.Sequential, *, num_classes: int = 1000, pool_size: int = 7, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(512 * pool_size * pool_size, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _vgg_features(cfg: Sequence[int | str], in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(c, int(v), kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(nn.ReLU(inplace=True))
            c = int(v)
    return nn.Sequential(*layers)


def vgg16(
    *, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, batch_norm: bool = False,
    pool_size: int = 7, dropout: float = 0.5,
) -> VGG:
    """torchvision's ``vgg16`` (or ``vgg16_bn`` with ``batch_norm``); any image_size >= 32."""
    _check_sizes(num_classes, in_channels, image_size, 32)
    model = VGG(_vgg_features(VGG16_CFG, in_channels, batch_norm), num_classes=num_classes, pool_size=pool_size,
                dropout=dropout)
    _classifier(model, (in_channels, image_size, image_size))
    return model


def vgg16_bn(
    *, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, pool_size: int = 7,
    dropout: float = 0.5,
) -> VGG:
    """torchvision's ``vgg16_bn``: a BatchNorm2d after every conv (the convs keep their bias)."""
    return vgg16(num_classes=num_classes, in_channels=in_channels, image_size=image_size, batch_norm=True,
                 pool_size=pool_size, dropout=dropout)


# -- ResNet-18 ----------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
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


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks (module names and initialisation as there)."""

    def __init__(self, layers: Sequence[int], *, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(*, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> ResNet:
    """torchvision's ``resnet18`` (7x7 stride-2 stem and max-pool; any image_size >= 32)."""
    _check_sizes(num_classes, in_channels, image_size, 32)
    model = ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
    _classifier(model, (in_channels, image_size, image_size))
    return model
