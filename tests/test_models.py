"""The model zoo: torchvision's VGG-16 / VGG-16-BN / ResNet-18 without torchvision (same parameter
counts and names), any input size the architecture allows, and the small nets for the demo."""

from __future__ import annotations

import pytest
import torch

from nm_optim import models


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,count",
    [("vgg16", 138_357_544), ("vgg16_bn", 138_365_992), ("resnet18", 11_689_512)],
)
def test_parameter_counts_match_torchvision_at_1000_classes(name, count):
    with torch.device("meta"):
        model = models.get_model(name, num_classes=1000, image_size=224)
    assert n_params(model) == count


def test_vgg_module_names_are_torchvision_s():
    with torch.device("meta"):
        model = models.vgg16_bn(num_classes=10)
    names = [n for n, _ in model.named_parameters()]
    assert names[:4] == ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias"]
    assert names[-2:] == ["classifier.6.weight", "classifier.6.bias"]
    assert model.classifier[0].in_features == 512 * 7 * 7
    assert isinstance(model.avgpool, torch.nn.AdaptiveAvgPool2d) and model.avgpool.output_size == (7, 7)


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("image_size", [32, 64])
def test_every_model_maps_images_to_logits(name, image_size):
    with torch.device("meta"):
        model = models.get_model(name, num_classes=7, in_channels=3, image_size=image_size)
        x = models.example_input(model, batch_size=2)
        assert model(x).shape == (2, 7)
    assert model.input_shape == (3, image_size, image_size)
    # the logits go into cross-entropy, which the model declares for find_symmetries' translation
    assert model.nm_optim_loss is torch.nn.functional.cross_entropy
    assert "nm_optim_loss" not in dict(model.named_modules()) and len(model.state_dict()) == len(
        [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("name", ["mlp", "small_vgg", "small_vgg_bn"])
def test_the_demo_nets_run_on_8x8_digits_and_learn(name):
    torch.manual_seed(0)
    model = models.get_model(name, num_classes=10, in_channels=1, image_size=8)
    assert n_params(model) < 50_000
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], "memorises a small batch"


def test_pool_size_gives_the_cifar_classifier():
    with torch.device("meta"):
        model = models.vgg16(num_classes=10, image_size=32, pool_size=1)
    assert model.classifier[0].in_features == 512


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown model 'vgg19'.*mlp, small_vgg, small_vgg_bn, vgg16, vgg16_bn, resnet18"):
        models.get_model("vgg19")
    with pytest.raises(ValueError, match="image_size must be at least 32"):
        models.get_model("vgg16", image_size=16)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        models.get_model("mlp", num_classes=0)
    with pytest.raises(ValueError, match="has no input_shape"):
        models.example_input(torch.nn.Linear(2, 2))
