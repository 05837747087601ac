"""Layer discovery and selection: names and shapes from a real forward pass; globs; close-match errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from neuropredictor.errors import LayerNotFoundError
from neuropredictor.layers import describe_layers, filter_layers, pick_tensor, select_layers
from neuropredictor.models import load_model

# AlexNet's layers as the seed document names them, with the output shapes of the architecture
# (Krizhevsky et al. as implemented in torchvision) for a 224x224 image
ALEXNET = {
    "features.0": (64, 55, 55), "features.1": (64, 55, 55), "features.2": (64, 27, 27),
    "features.3": (192, 27, 27), "features.4": (192, 27, 27), "features.5": (192, 13, 13),
    "features.6": (384, 13, 13), "features.7": (384, 13, 13), "features.8": (256, 13, 13),
    "features.9": (256, 13, 13), "features.10": (256, 13, 13), "features.11": (256, 13, 13),
    "features.12": (256, 6, 6), "avgpool": (256, 6, 6),
    "classifier.0": (9216,), "classifier.1": (4096,), "classifier.2": (4096,), "classifier.3": (4096,),
    "classifier.4": (4096,), "classifier.5": (4096,), "classifier.6": (1000,),
}


@pytest.fixture(scope="module")
def alexnet():
    return load_model("torchvision:alexnet", pretrained=False)


def test_alexnet_names_and_shapes_match_the_seed(alexnet):
    infos = {i.name: i for i in describe_layers(alexnet)}
    for name, shape in ALEXNET.items():
        assert infos[name].shape == shape, name
    assert infos["features.0"].type == "Conv2d" and infos["features.0"].params == 64 * 3 * 11 * 11 + 64
    assert infos["classifier.6"].type == "Linear" and infos["classifier.6"].leaf
    assert not infos["features"].leaf
    assert infos["output"].shape == (1000,)


def test_resnet50_and_vit_layer_names():
    resnet = {i.name: i for i in describe_layers(load_model("torchvision:resnet50", pretrained=False))}
    assert [resnet[f"layer{k}"].shape for k in (1, 2, 3, 4)] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    assert resnet["layer3.5.conv2"].shape == (256, 14, 14) and resnet["layer1.0.downsample.0"].type == "Conv2d"
    vit = {i.name: i for i in describe_layers(load_model("timm:vit_tiny_patch16_224", pretrained=False))}
    assert [vit[f"blocks.{k}"].shape for k in range(12)] == [(197, 192)] * 12
    assert vit["blocks.3.attn.qkv"].shape == (197, 576)
    assert vit["head"].shape == (1000,)


def test_glob_matches_within_one_segment():
    names = ["blocks", "blocks.0", "blocks.0.attn", "blocks.1", "blocks.10", "blocks.10.mlp.fc1", "head"]
    assert select_layers(names, "blocks.*") == ["blocks.0", "blocks.1", "blocks.10"]
    assert select_layers(names, "blocks.1?") == ["blocks.10"]
    assert select_layers(names, "blocks.**") == ["blocks.0", "blocks.0.attn", "blocks.1", "blocks.10", "blocks.10.mlp.fc1"]
    # model order, duplicates merged, exact names and globs mixed
    assert select_layers(names, "head,blocks.0,blocks.*") == ["blocks.0", "blocks.1", "blocks.10", "head"]


def test_unknown_layer_names_close_matches(alexnet):
    names = [i.name for i in describe_layers(alexnet)]
    with pytest.raises(LayerNotFoundError) as info:
        select_layers(names, ["features.0", "features.13"])
    msg = str(info.value)
    assert "features.13" in msg and "features.1" in msg and "neuropredictor layers" in msg
    with pytest.raises(LayerNotFoundError, match="classifier"):
        select_layers(names, "clasifier.*")


def test_filter_for_listing(alexnet):
    infos = describe_layers(alexnet)
    assert [i.name for i in filter_layers(infos, "classifier.*")] == [f"classifier.{k}" for k in range(7)]


@dataclasses.dataclass
class _Out:
    attn: None
    hidden: torch.Tensor


def test_pick_tensor_rule():
    a, b = torch.ones(2, 3), torch.zeros(2, 4)
    assert pick_tensor(a) is a
    assert pick_tensor((a, b)) is a  # attention blocks: (hidden, weights) -> hidden
    assert pick_tensor((None, [b, a])) is b  # first element holding a tensor, recursively
    assert pick_tensor({"logits": a, "last_hidden_state": b}) is b  # HF outputs: last_hidden_state first
    assert pick_tensor({"pooled": a, "x": b}) is a
    assert pick_tensor(_Out(None, b)) is b
    assert pick_tensor("text") is None


class _TupleModel(nn.Module):
    """A block that returns (hidden, attention weights), like many attention implementations."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)[..., :8]
        h, _ = self.attn(tokens, tokens, tokens)
        return self.fc(h)


def test_tuple_outputs_record_first_tensor():
    from neuropredictor.extractor import Extractor
    from neuropredictor.models import LoadedModel, parse_spec
    from neuropredictor.models.base import imagenet_transform

    torch.manual_seed(0)
    module = _TupleModel().eval()
    model = LoadedModel(parse_spec("custom:x:y"), module, imagenet_transform(32, 16), (8, 4, 4), "random")
    infos = {i.name: i for i in describe_layers(model)}
    assert infos["attn"].shape == (16, 8)
    x = torch.randn(3, 8, 4, 4)
    with Extractor(model, ["attn"], layer_infos=list(infos.values())) as ex:
        got = ex(x)["attn"]
    tokens = x.flatten(2).transpose(1, 2)[..., :8]
    with torch.inference_mode():
        ref, _ = module.attn(tokens, tokens, tokens)
    assert torch.equal(got, ref)


def test_cli_layers_json_shows_seed_names():
    from typer.testing import CliRunner

    from neuropredictor.cli import app

    result = CliRunner().invoke(app, ["layers", "torchvision:alexnet", "--no-pretrained", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    shapes = {layer["name"]: tuple(layer["shape"]) for layer in data["layers"]}
    assert {k: shapes[k] for k in ALEXNET} == ALEXNET
    table = CliRunner().invoke(app, ["layers", "torchvision:alexnet", "--no-pretrained", "classifier.*"])
    assert table.exit_code == 0 and "classifier.6" in table.output and "features.0" not in table.output


def test_cli_unknown_layer_or_model_exits_with_message():
    from typer.testing import CliRunner

    from neuropredictor.cli import app

    result = CliRunner().invoke(app, ["layers", "torchvision:alexnett", "--no-pretrained"])
    assert result.exit_code == 2 and "alexnet" in result.output


@pytest.mark.parametrize("spec,expected", [
    # rule 1: timm's feature_info
    ("timm:resnet18", ["act1", "layer1", "layer2", "layer3", "layer4"]),
    ("timm:vit_tiny_patch16_224", [f"blocks.{i}" for i in range(12)]),
    ("openclip:convnext_tiny", [f"trunk.stages.{i}" for i in range(4)]),  # a timm trunk inside: its feature_info
    # rule 2: a trunk of blocks
    ("torchvision:vit_b_16", [f"encoder.layers.encoder_layer_{i}" for i in range(12)]),
    ("openclip:ViT-B-32", [f"transformer.resblocks.{i}" for i in range(12)]),
    # rule 3: ResNet-style stages
    ("torchvision:resnet18", ["layer1", "layer2", "layer3", "layer4"]),
    # rule 4: the last module at each resolution of `features` (AlexNet: 55, 27, 13 pixels, then the pool to 6)
    ("torchvision:alexnet", ["features.1", "features.4", "features.11", "features.12"]),
])
def test_auto_preset_picks_representative_depths(spec, expected):
    from neuropredictor.layers import preset_layers

    model = load_model(spec, pretrained=False)
    assert preset_layers(model, describe_layers(model)) == expected


def test_auto_preset_picks_the_stages_of_hugging_face_conv_nets(tmp_path):
    # HF ResNet, ConvNeXt, RegNet keep their stages under encoder.stages: auto gave embedder, encoder, pooler
    transformers = pytest.importorskip("transformers")
    from neuropredictor.layers import preset_layers

    transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1]).save_pretrained(tmp_path)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 64}).save_pretrained(tmp_path)
    model = load_model(f"hf:{tmp_path}", pretrained=False)
    assert preset_layers(model, describe_layers(model)) == [f"encoder.stages.{i}" for i in range(4)]


def test_auto_preset_on_hugging_face_swin_and_mobilenet(tmp_path):
    # HF Swin stages end by merging patches: the stage module gave the next resolution's map (the last two
    # at 7 x 7, no 56 x 56); HF MobileNetV2 keeps its blocks under `layer` (auto gave stem, head, pooler)
    transformers = pytest.importorskip("transformers")
    from neuropredictor.layers import preset_layers

    transformers.SwinConfig(embed_dim=8, depths=[1, 2, 1, 1], num_heads=[1, 1, 1, 1]).save_pretrained(tmp_path / "swin")
    transformers.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(tmp_path / "swin")
    swin = load_model(f"hf:{tmp_path / 'swin'}", pretrained=False)
    infos = {i.name: i for i in describe_layers(swin)}
    picked = preset_layers(swin, list(infos.values()))
    assert picked == ["encoder.layers.0.blocks.0", "encoder.layers.1.blocks.1", "encoder.layers.2.blocks.0",
                      "encoder.layers.3"]
    assert [infos[n].shape for n in picked] == [(56 * 56, 8), (28 * 28, 16), (14 * 14, 32), (7 * 7, 64)]
    transformers.MobileNetV2Config(depth_multiplier=0.35).save_pretrained(tmp_path / "mobilenet")
    transformers.ViTImageProcessor(size={"height": 96, "width": 96}).save_pretrained(tmp_path / "mobilenet")
    mobilenet = load_model(f"hf:{tmp_path / 'mobilenet'}", pretrained=False)
    assert preset_layers(mobilenet, describe_layers(mobilenet)) == [f"layer.{i}" for i in range(16)]


def test_auto_preset_in_extraction_and_fallback(tmp_path):
    from pathlib import Path

    from neuropredictor.extractor import Extractor
    from neuropredictor.layers import preset_layers

    spec = f"custom:{Path(__file__).parent / 'custom_models.py'}:robust_resnet_tiny"
    model = load_model(spec, pretrained=False)
    assert preset_layers(model, describe_layers(model)) == ["stages.0", "stages.1"]
    with Extractor(model, ["auto", "head"], reduce="avgpool") as ex:  # a preset mixes with names
        assert ex.layers == ["stages.0", "stages.1", "head"]

    class Plain(nn.Module):  # rule 5: no known structure: the top-level children
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.pool(self.conv(x)).flatten(1))

    from neuropredictor.models import LoadedModel, parse_spec

    plain = LoadedModel(parse_spec("custom:x:y"), Plain(), lambda im: torch.zeros(3, 8, 8), (3, 8, 8), "random")
    assert preset_layers(plain, describe_layers(plain)) == ["conv", "pool", "fc"]
    with pytest.raises(LayerNotFoundError, match="presets: auto"):
        preset_layers(plain, describe_layers(plain), "deep")


def test_cli_layers_preset_lists_what_auto_picks():
    from typer.testing import CliRunner

    from neuropredictor.cli import app

    listed = CliRunner().invoke(app, ["layers", "torchvision:resnet18", "--no-pretrained", "--preset", "auto", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [layer["name"] for layer in json.loads(listed.stdout)["layers"]] == ["layer1", "layer2", "layer3", "layer4"]
    table = CliRunner().invoke(app, ["layers", "torchvision:resnet18", "--no-pretrained", "--preset", "auto", "layer4"])
    assert table.exit_code == 0 and "layer4" in table.output and "layer2" not in table.output and "conv1" not in table.output
    bad = CliRunner().invoke(app, ["layers", "torchvision:resnet18", "--no-pretrained", "--preset", "deep"])
    assert bad.exit_code == 2 and "presets: auto" in bad.output
