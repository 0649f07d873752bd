from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from skimage import data

from trainables.models import (
    StagedNet,
    available_weights,
    backbone_names,
    build_backbone,
    compound_coefficients,
    count_params,
    default_resolution,
    describe_backbones,
    imagenet_weights_file,
    is_efficientnet,
    stage_count,
)
from trainables.models.lite import LITE_MEAN, LITE_STD, packaged_lite0_path

EXPECTED_STAGES = {
    "resnet18": 5,
    "resnet34": 5,
    "resnet50": 5,
    "resnet101": 5,
    "vgg11_bn": 5,
    "vgg16_bn": 5,
    "alexnet": 3,
    **{f"efficientnet_b{i}": 9 for i in range(8)},
    "efficientnet": 9,
    "efficientnet_lite0": 9,
}
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def _eval(net: StagedNet, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(x)


def test_registry_holds_exactly_the_documented_backbones():
    assert backbone_names() == list(EXPECTED_STAGES)
    assert {n: stage_count(n) for n in backbone_names()} == EXPECTED_STAGES


@pytest.mark.parametrize("name", list(EXPECTED_STAGES))
def test_stages_head_and_split_forward(name):
    torch.manual_seed(0)
    net = build_backbone(name, num_classes=7).eval()
    assert isinstance(net, StagedNet) and net.name == name
    assert len(net.stages) == stage_count(name)
    assert net.num_classes == 7 and net.classifier.out_features == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = net(x)
        assert full.shape == (2, 7)
        for k in range(len(net.stages) + 1):
            split = net.forward_head(net.forward_stages(net.forward_stages(x, 0, k), k))
            torch.testing.assert_close(split, full)


@pytest.mark.parametrize("index", range(8))
def test_efficientnet_b_params_equal_torchvision(index):
    name = f"efficientnet_b{index}"
    reference = getattr(torchvision.models, name)(weights=None)
    assert count_params(build_backbone(name, num_classes=1000)) == count_params(reference)


def test_free_efficientnet_at_unit_coefficients_is_b0():
    b0 = count_params(torchvision.models.efficientnet_b0(weights=None))
    assert count_params(build_backbone("efficientnet", num_classes=1000)) == b0
    net = build_backbone("efficientnet", num_classes=1000, width_mult=1.0, depth_mult=1.0)
    assert count_params(net) == b0
    assert net.resolution == 224


def test_free_efficientnet_from_phi_follows_compound_coefficients():
    c = compound_coefficients(phi=1)
    by_phi = build_backbone("efficientnet", num_classes=10, phi=1)
    by_hand = build_backbone(
        "efficientnet",
        num_classes=10,
        width_mult=c.width_mult,
        depth_mult=c.depth_mult,
        resolution=c.resolution,
    )
    assert by_phi.resolution == by_hand.resolution == 256
    assert count_params(by_phi) == count_params(by_hand)
    # depth 1.2: each group's block count is ceil(repeats * 1.2)
    groups = [len(stage) for stage in by_phi.stages[1:8]]
    assert groups == [math.ceil(n * 1.2) for n in (1, 2, 2, 3, 3, 4, 1)]
    b0 = count_params(build_backbone("efficientnet", num_classes=10))
    assert count_params(by_phi) > b0
    assert default_resolution("efficientnet", phi=1) == 256
    assert default_resolution("efficientnet", phi=2, gamma=1.0) == 224
    assert default_resolution("efficientnet", resolution=320) == 320
    assert default_resolution("efficientnet") == 224


def test_default_resolutions():
    assert default_resolution("resnet18") == 224
    assert default_resolution("efficientnet_b3") == 300
    assert default_resolution("efficientnet_b7") == 600


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="resnet18.*efficientnet_lite0"):
        build_backbone("resnet19", num_classes=3)
    for fn in (stage_count, default_resolution, available_weights, is_efficientnet):
        with pytest.raises(ValueError, match="valid names"):
            fn("resnet19")


def test_unknown_kwargs_are_named():
    with pytest.raises(ValueError, match=r"\['phi'\].*resnet18"):
        build_backbone("resnet18", num_classes=3, phi=1)
    with pytest.raises(ValueError, match=r"\['depth'\].*width_mult"):
        build_backbone("efficientnet", num_classes=3, depth=2)
    with pytest.raises(ValueError, match="phi"):
        default_resolution("efficientnet_b0", phi=1)


def test_mixing_free_and_compound_coefficients_is_an_error():
    with pytest.raises(ValueError, match="not both"):
        build_backbone("efficientnet", num_classes=3, phi=1, width_mult=1.1)
    with pytest.raises(ValueError, match="not both"):
        default_resolution("efficientnet", gamma=1.2, resolution=256)
    with pytest.raises(ValueError, match="need phi"):
        build_backbone("efficientnet", num_classes=3, alpha=1.3)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_backbone("resnet18", num_classes=0)


def test_weights_choices_per_backbone():
    assert available_weights("resnet50") == ["imagenet"]
    assert available_weights("efficientnet_lite0") == ["packaged"]
    assert available_weights("efficientnet") == []
    with pytest.raises(ValueError, match=r"packaged.*\['efficientnet_lite0'\]"):
        build_backbone("resnet18", num_classes=3, weights="packaged")
    with pytest.raises(ValueError, match="imagenet.*resnet18"):
        build_backbone("efficientnet_lite0", num_classes=3, weights="imagenet")
    with pytest.raises(ValueError, match="imagenet.*efficientnet_b7"):
        build_backbone("efficientnet", num_classes=3, weights="imagenet")
    with pytest.raises(ValueError, match="no/such/file.pt.*existing file"):
        build_backbone("resnet18", num_classes=3, weights="no/such/file.pt")


def test_is_efficientnet():
    assert is_efficientnet("efficientnet_b3")
    assert is_efficientnet("efficientnet")
    assert is_efficientnet("efficientnet_lite0")
    assert not is_efficientnet("resnet50")


def test_normalisation_follows_the_weights():
    assert build_backbone("resnet18", num_classes=2).mean == (0.485, 0.456, 0.406)
    assert build_backbone("efficientnet_b0", num_classes=2).std == (0.229, 0.224, 0.225)
    lite = build_backbone("efficientnet_lite0", num_classes=2)
    assert lite.mean == LITE_MEAN and lite.std == LITE_STD
    assert lite.mean[0] == pytest.approx(0.498, abs=1e-3)
    assert lite.std[0] == pytest.approx(0.502, abs=1e-3)


def test_reset_classifier_only_replaces_the_last_linear():
    net = build_backbone("vgg11_bn", num_classes=1000)
    hidden = net.head[2][3].weight
    net.reset_classifier(12)
    assert net.num_classes == 12 and net.head[2][3].weight is hidden
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 12)


def test_saved_staged_state_dict_round_trips(tmp_path):
    torch.manual_seed(0)
    net = build_backbone("resnet18", num_classes=5)
    path = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), path)
    again = build_backbone("resnet18", num_classes=5, weights=str(path))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_eval(again, x), _eval(net, x), rtol=0, atol=0)
    # a training checkpoint with the model under "model", saved from a compiled model
    compiled = {f"_orig_mod.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": compiled, "epoch": 3}, tmp_path / "state.pt")
    from_checkpoint = build_backbone("resnet18", num_classes=5, weights=tmp_path / "state.pt")
    torch.testing.assert_close(_eval(from_checkpoint, x), _eval(net, x), rtol=0, atol=0)


def test_raw_torchvision_state_dict_loads_then_head_is_replaced(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.efficientnet_b0(weights=None).eval()
    path = tmp_path / "b0.pth"
    torch.save(reference.state_dict(), path)
    x = torch.randn(2, 3, 64, 64)
    same = build_backbone("efficientnet_b0", num_classes=1000, weights=str(path))
    with torch.no_grad():
        torch.testing.assert_close(_eval(same, x), reference(x), rtol=0, atol=0)
    ten = build_backbone("efficientnet_b0", num_classes=10, weights=str(path))
    assert ten.num_classes == 10
    torch.testing.assert_close(
        ten.stages[3][0].block[0][0].weight, reference.features[3][0].block[0][0].weight
    )
    # another architecture's weights are refused with the keys that do not fit
    wrong = build_backbone("resnet18", num_classes=1000)
    torch.save(wrong.state_dict(), path)
    with pytest.raises(ValueError, match="missing key"):
        build_backbone("resnet34", num_classes=10, weights=str(path))


def test_state_dict_with_other_class_count_is_rejected(tmp_path):
    torch.save(build_backbone("resnet18", num_classes=4).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="4-class classifier"):
        build_backbone("resnet18", num_classes=6, weights=str(tmp_path / "w.pt"))


def test_imagenet_offline_error_is_clear_and_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    attempts = []

    def offline(url, dst, *args, **kwargs):
        # Never touch the network from a test: behave like a machine without internet.
        attempts.append((url, dst))
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        build_backbone("resnet18", num_classes=3, weights="imagenet")
    assert time.monotonic() - start < 10
    message = str(info.value)
    cache = os.path.join(str(tmp_path), "hub", "checkpoints")
    assert "resnet18-f37072fd.pth" in message
    assert cache in message
    assert "weights=<path" in message and "packaged" in message
    assert len(attempts) == 1 and attempts[0][1].startswith(cache)


def test_imagenet_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    net = build_backbone("resnet18", num_classes=1000, weights="imagenet")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_eval(net, x), reference(x), rtol=0, atol=0)
    assert build_backbone("resnet18", num_classes=3, weights="imagenet").num_classes == 3


IMAGENET_BACKBONES = [n for n in backbone_names() if "imagenet" in available_weights(n)]


@pytest.mark.parametrize("name", IMAGENET_BACKBONES)
def test_imagenet_weights_file_is_torchvisions(name):
    # The registry keeps the file name as data so pre-flight needs no torchvision import.
    url, file = imagenet_weights_file(name)
    assert url == torchvision.models.get_model_weights(name).DEFAULT.url
    assert file == Path(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1])


@pytest.mark.parametrize(
    "env",
    [{}, {"TORCH_HOME": "/opt/th"}, {"XDG_CACHE_HOME": "/x/cache"},
     {"TORCH_HOME": "~/th", "XDG_CACHE_HOME": "/x/cache"}],
)
def test_torch_hub_dir_without_torch_matches_torch(env):
    # In a process that has not imported torch, the directory is computed by hand: it must
    # be the one torch.hub uses for the same environment.
    code = ("import sys; from trainables.models.registry import torch_hub_dir; "
            "d = torch_hub_dir(); assert 'torch' not in sys.modules; "
            "import torch; print(d == __import__('pathlib').Path(torch.hub.get_dir()))")
    clean = {k: v for k, v in os.environ.items() if k not in ("TORCH_HOME", "XDG_CACHE_HOME")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_describe_backbones():
    rows = describe_backbones()
    assert [r["name"] for r in rows] == backbone_names()
    assert all(
        set(r) == {"name", "stages", "params", "gmacs", "resolution", "weights"} for r in rows
    )
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnet18"]["params"] == 11_689_512
    assert by_name["resnet18"]["gmacs"] == pytest.approx(1.814, abs=0.01)
    assert by_name["efficientnet_b0"]["gmacs"] == pytest.approx(0.39, rel=0.05)
    assert by_name["efficientnet_b7"]["resolution"] == 600
    assert by_name["efficientnet_lite0"]["weights"] == ["packaged"]
    assert by_name["alexnet"]["stages"] == 3


# ---------------------------------------------------------------------------- lite0 weights


def _image(net: StagedNet, image) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    x = TF.center_crop(TF.resize(x, [224], antialias=True), [224])
    return TF.normalize(x, list(net.mean), list(net.std)).unsqueeze(0)


@pytest.fixture(scope="module")
def lite0() -> StagedNet:
    return build_backbone("efficientnet_lite0", num_classes=1000, weights="packaged").eval()


@pytest.mark.parametrize(
    ("image", "classes"), [(data.chelsea, CAT_CLASSES), (data.coffee, COFFEE_CLASSES)]
)
def test_packaged_lite0_recognises_real_images(lite0, image, classes):
    with torch.no_grad():
        probs = lite0(_image(lite0, image())).softmax(-1)[0]
    top5 = set(probs.topk(5).indices.tolist())
    assert top5 & classes
    # confidently right, not lucky: the right classes hold most of the probability
    assert probs[sorted(classes)].sum() > 0.5


def test_packaged_lite0_keeps_or_replaces_the_pretrained_head(lite0):
    package = torch.load(packaged_lite0_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(lite0.classifier.weight, package["_fc.weight"])
    ten = build_backbone("efficientnet_lite0", num_classes=10, weights="packaged")
    assert ten.num_classes == 10
    torch.testing.assert_close(ten.stages[0][0].weight, package["_conv_stem.weight"])


def test_lite0_package_file_also_loads_as_a_path(lite0):
    net = build_backbone("efficientnet_lite0", num_classes=1000, weights=packaged_lite0_path())
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(_eval(net, x), _eval(lite0, x), rtol=0, atol=0)


def test_lite_normalisation_matches_the_weights_batch_norm_statistics(lite0):
    # With the normalisation the weights were trained with, the stem's batch-norm
    # inputs on real photos sit near its running statistics; with ImageNet's they do not.
    conv, bn = lite0.stages[0][0], lite0.stages[0][1]

    def mismatch(mean, std):
        images = []
        for image in (data.chelsea(), data.coffee(), data.astronaut()):
            x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
            x = TF.center_crop(TF.resize(x, [224], antialias=True), [224])
            images.append(TF.normalize(x, list(mean), list(std)))
        with torch.no_grad():
            h = conv(torch.stack(images))
        z = (h.mean((0, 2, 3)) - bn.running_mean) / (bn.running_var + bn.eps).sqrt()
        return z.abs().mean().item()

    assert mismatch(LITE_MEAN, LITE_STD) < 0.8 * mismatch(
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )


def test_lite_same_padding_gives_ceil_sized_outputs(lite0):
    with torch.no_grad():
        for side in (224, 225, 97):
            features = lite0.forward_stages(torch.zeros(1, 3, side, side))
            expected = side
            for _ in range(5):  # five stride-2 stages
                expected = math.ceil(expected / 2)
            assert features.shape == (1, 1280, expected, expected)
