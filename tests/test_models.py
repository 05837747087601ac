"""Model loading: the spec grammar, one real forward pass per source, local weights, offline errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neuropredictor.errors import LayerNotFoundError, ModelSpecError, WeightsUnavailableError
from neuropredictor.extractor import Extractor
from neuropredictor.models import list_models, load_model, parse_spec

TESTS = Path(__file__).parent


def _image(seed: int = 0, size=(300, 240)) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _batch(model, n: int = 2) -> torch.Tensor:
    return torch.stack([model.transform(_image(i)) for i in range(n)])


@pytest.mark.parametrize(
    "text,source,name,tag",
    [
        ("timm:resnet50", "timm", "resnet50", None),
        ("torchvision:resnet50@IMAGENET1K_V2", "torchvision", "resnet50", "IMAGENET1K_V2"),
        ("openclip:ViT-B-32@laion2b_s34b_b79k", "openclip", "ViT-B-32", "laion2b_s34b_b79k"),
        ("hf:google/siglip-base-patch16-224", "hf", "google/siglip-base-patch16-224", None),
        ("custom:path/to/file.py:make", "custom", "path/to/file.py:make", None),
        ("custom:pkg.mod:factory", "custom", "pkg.mod:factory", None),
    ],
)
def test_parse_spec(text, source, name, tag):
    spec = parse_spec(text)
    assert (spec.source, spec.name, spec.tag) == (source, name, tag)
    assert str(spec) == text


@pytest.mark.parametrize("text", ["resnet50", "keras:resnet50", "timm:", "custom:file.py", "timm:resnet50@"])
def test_parse_spec_errors(text):
    with pytest.raises(ModelSpecError, match="spec|source|factory"):
        parse_spec(text)


def test_unknown_models_name_close_matches():
    with pytest.raises(ModelSpecError, match=r"Close names: resnet50, .* List them: neuropredictor models "
                                             r"'torchvision:resnet5\*'"):  # was a Python list, and no pattern
        load_model("torchvision:resnet5O", pretrained=False)
    # the pattern each message names lists that family (a pattern may name its source, as a spec does)
    assert "timm:resnet18" in list_models(pattern="timm:res*") and "torchvision:resnet50" in list_models(
        pattern="torchvision:resnet5*")
    assert list_models(pattern="timm:*") == list_models("timm")
    # no close name: the pattern was 'timm:*qqq*', which lists nothing
    with pytest.raises(ModelSpecError, match=r"Close names: none\. List them: neuropredictor models 'timm:\*'$"):
        load_model("timm:qqq", pretrained=False)
    with pytest.raises(ModelSpecError, match="timm has no model"):
        load_model("timm:resnet_does_not_exist", pretrained=False)
    with pytest.raises(ModelSpecError, match="IMAGENET1K_V1"):
        load_model("torchvision:resnet50@NOPE", pretrained=False)
    # transpositions found no close name ("Close names: []"), and a mistyped tag was timm's bare RuntimeError
    with pytest.raises(ModelSpecError, match=r"Close names: resnet18, .*neuropredictor models 'timm:res\*'"):
        load_model("timm:resent18", pretrained=False)
    with pytest.raises(ModelSpecError, match=r"no weights 'a1_in1kk' for resnet18; its tags: a1_in1k, a2_in1k"):
        load_model("timm:resnet18.a1_in1kk", pretrained=False)
    with pytest.raises(ModelSpecError, match=r"source 'tim' in 'tim:resnet18' \(did you mean 'timm'\?\)"):
        load_model("tim:resnet18", pretrained=False)


def _check_forward(model, layer: str, reduce: str = "avgpool") -> torch.Tensor:
    x = _batch(model)
    with Extractor(model, [layer], reduce=reduce) as ex:
        out = ex(x)[layer]
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])  # two different images give different features
    return out


def test_source_timm():
    model = load_model("timm:vit_tiny_patch16_224", pretrained=False)
    assert model.input_size == (3, 224, 224) and model.weights == "random:seed0"
    _check_forward(model, "blocks.11", "cls")


def test_source_torchvision_transform_without_weights():
    model = load_model("torchvision:resnet18", pretrained=False)
    assert model.input_size == (3, 224, 224)
    # the weights enum's eval transform: resize 256, centre crop 224, ImageNet normalisation
    img = _image(1)
    x = model.transform(img)
    from torchvision.transforms import functional as TF

    ref = TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(img, 256), 224)), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.allclose(x, ref, atol=2e-2)
    _check_forward(model, "layer4")


def test_torchvision_without_downloads_builds_the_network_its_tag_names(monkeypatch, tmp_path):
    # Built without its weights (random, or a checkpoint of them), a tag's network is what torchvision builds
    # for the weights: inception and googlenet renormalise their input, SWAG ViTs take 384 px; and no
    # backbone's weights are fetched for a segmentation model.
    import torch.hub

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    assert load_model("torchvision:googlenet", pretrained=False).module.transform_input
    # a checkpoint of torchvision's googlenet weights (its builder drops the auxiliary heads) loads
    import torchvision.models as tvm

    torch.manual_seed(0)
    net = tvm.googlenet(weights=None, aux_logits=False, transform_input=True, init_weights=False).eval()
    torch.save(net.state_dict(), tmp_path / "googlenet.pth")
    loaded = load_model("torchvision:googlenet", weights=tmp_path / "googlenet.pth")
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(loaded.module.eval()(x), net(x))
    swag = load_model("torchvision:vit_b_16@IMAGENET1K_SWAG_E2E_V1", pretrained=False)
    assert swag.input_size == (3, 384, 384) and swag.module.image_size == 384
    _check_forward(swag, "encoder.layers.encoder_layer_0", "cls")
    assert load_model("torchvision:deeplabv3_mobilenet_v3_large", pretrained=False).module is not None


def test_openclip_tag_preprocessing_without_its_weights():
    # Built without downloading (random weights, or weights=PATH), a tag's preprocessing was OpenAI's
    # (mean/std, shortest-side resize and crop): PE, SigLIP and DFN tags squash to the square and use their own.
    model = load_model("openclip:PE-Core-T-16-384@meta", pretrained=False)
    steps = {type(t).__name__: t for t in model.transform.transforms}
    assert tuple(steps["Normalize"].mean) == (0.5, 0.5, 0.5) and "CenterCrop" not in steps
    assert tuple(steps["Resize"].size) == (384, 384) and model.input_size == (3, 384, 384)


def test_openclip_tag_trained_with_quickgelu_gets_it():
    # open_clip builds GELU for ViT-B-32 whatever the tag; the openai and laion400m weights were trained
    # with QuickGELU
    def act(spec):
        return type(load_model(spec, pretrained=False).module.transformer.resblocks[0].mlp.gelu).__name__

    assert act("openclip:ViT-B-32@openai") == act("openclip:ViT-B-32@laion400m_e32") == "QuickGELU"
    assert act("openclip:ViT-B-32@laion2b_s34b_b79k") == act("openclip:ViT-B-32") == "GELU"


def test_source_clip_is_the_image_tower():
    model = load_model("clip:ViT-B-32", pretrained=False)
    assert type(model.module).__name__ == "VisionTransformer"
    assert model.input_size == (3, 224, 224)
    _check_forward(model, "transformer.resblocks.11", "cls")


def test_source_openclip_resnet():
    model = load_model("openclip:RN50", pretrained=False)
    assert type(model.module).__name__ == "ModifiedResNet"
    _check_forward(model, "layer2")


def _tiny_hf_dir(tmp_path: Path, dual: bool) -> Path:
    transformers = pytest.importorskip("transformers")
    path = tmp_path / ("clip" if dual else "vit")
    if dual:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100)
        config = transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    else:
        config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=48, patch_size=16)
        processor = transformers.ViTImageProcessor(size={"height": 48, "width": 48})
    config.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_source_hf_vit_and_processor_settings(tmp_path):
    path = _tiny_hf_dir(tmp_path, dual=False)
    model = load_model(f"hf:{path}", pretrained=False)
    assert model.input_size == (3, 48, 48)
    out = _check_forward(model, "layers.2", "cls")
    assert out.shape == (2, 32)
    # our transform reproduces the image processor's own output
    import transformers

    proc = transformers.AutoImageProcessor.from_pretrained(path)
    img = _image(3)
    ref = torch.as_tensor(np.asarray(proc(images=img, return_tensors="np")["pixel_values"][0]))
    assert torch.allclose(model.transform(img), ref, atol=3e-2)


def test_source_hf_layers_the_checkpoint_lacks_are_refused(tmp_path):
    # a ViT saved as ViTForImageClassification (as google/vit-base-patch16-224 is) has no pooler: AutoModel
    # builds one at random, and its output was stored under the pretrained weights' name
    transformers = pytest.importorskip("transformers")
    path = _tiny_hf_dir(tmp_path, dual=False)
    torch.manual_seed(0)
    classifier = transformers.ViTForImageClassification(transformers.AutoConfig.from_pretrained(path)).eval()
    classifier.save_pretrained(path)
    model = load_model(f"hf:{path}", pretrained=True)
    assert model.untrained == ("pooler.dense",)
    for layer in ("pooler", "pooler.dense", "pooler.activation"):
        with pytest.raises(LayerNotFoundError, match=r"depends on pooler.dense, which the checkpoint .* has no weights"):
            Extractor(model, [layer])
    # the encoder is the checkpoint's, exactly
    x = torch.randn(2, 3, 48, 48)
    with Extractor(model, ["layers.2"]) as ex:
        got = ex(x)["layers.2"]
    want = classifier.vit(pixel_values=x, output_hidden_states=True).hidden_states[3]
    assert torch.equal(got, want)
    assert load_model(f"hf:{path}", pretrained=False).untrained == ()


def test_source_hf_bf16_checkpoint_runs_in_float32(tmp_path):
    # transformers 5 loads a model in its checkpoint's dtype: a bf16 checkpoint ran its forward in bf16 at
    # precision fp32 (about 0.4 % relative error on a 2-layer toy, more with depth), and the manifest said fp32.
    transformers = pytest.importorskip("transformers")
    path = _tiny_hf_dir(tmp_path, dual=False)
    torch.manual_seed(0)
    reference = transformers.ViTModel(transformers.AutoConfig.from_pretrained(path)).eval()
    reference.to(torch.bfloat16).save_pretrained(path)  # what a bf16 checkpoint holds
    reference.float()  # its weights exactly (bf16 -> float32), computed in float32
    model = load_model(f"hf:{path}")
    assert all(p.dtype == torch.float32 for p in model.module.parameters())
    x = _batch(model)
    with Extractor(model, ["output"]) as ex, torch.inference_mode():
        assert torch.equal(ex(x)["output"], reference(pixel_values=x).last_hidden_state)


@pytest.mark.parametrize("name,kwargs", [
    ("ConvNextImageProcessor", {}), ("MobileViTImageProcessor", {}), ("LevitImageProcessor", {}),
    ("CLIPImageProcessor", {}), ("BitImageProcessor", {}), ("EfficientNetImageProcessor", {}),
    ("EfficientNetImageProcessor", {"rescale_offset": True, "include_top": False})])
@pytest.mark.parametrize("size", [(300, 420), (300, 401), (360, 640)])
def test_hf_processor_families_match_their_processor_on_a_non_square_image(name, kwargs, size):
    # ConvNeXt warps to the square from 384 px (a short-side resize made every non-square image an invalid
    # row), MobileViT takes BGR, LeViT resizes to 256/224 of its crop before cropping, EfficientNet divides
    # by the std twice; the centre crop's offset rounds down where the margin is odd (401 and 640 wide).
    transformers = pytest.importorskip("transformers")
    from neuropredictor.models.hf import processor_transform

    processor = getattr(transformers, name)(**kwargs)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))
    ref = torch.as_tensor(np.asarray(processor(images=img, return_tensors="np")["pixel_values"][0]))
    got = processor_transform(processor)(img)
    # resize rounding, in levels: the second division by the std magnifies it
    atol = 3e-2 / (min(processor.image_std) if getattr(processor, "include_top", False) else 1)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=atol)


@pytest.mark.parametrize("name,fast", [("CLIPImageProcessor", True), ("PerceiverImageProcessor", False),
                                       ("BridgeTowerImageProcessor", False)])
def test_hf_processors_not_read_as_tensor_ops_run_themselves(name, fast):
    # Perceiver crops before it resizes (224 became 256), BridgeTower's size has no height (KeyError): a
    # family whose steps differ from those read is checked on a probe image and runs its own processor
    import pickle

    transformers = pytest.importorskip("transformers")
    from neuropredictor.models.hf import checked_transform

    processor = getattr(transformers, name)()
    transform = pickle.loads(pickle.dumps(checked_transform(processor)))  # DataLoader workers get a copy
    assert (type(transform).__name__ == "Compose") == fast
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 420, 3), dtype=np.uint8))
    ref = torch.as_tensor(np.asarray(processor(images=img, return_tensors="np")["pixel_values"][0]))
    got = transform(img)
    assert got.shape == ref.shape and (got - ref).abs().mean() < 0.02


def test_hf_local_folder_weights_are_named_by_their_content(tmp_path):
    # A local folder has no commit hash: fine-tuned weights saved into it again read as the same weights
    # ("pretrained:main"), and a resume took the old store for the new model's.
    transformers = pytest.importorskip("transformers")
    path = _tiny_hf_dir(tmp_path, dual=False)
    torch.manual_seed(0)
    transformers.ViTModel(transformers.AutoConfig.from_pretrained(path)).save_pretrained(path)
    first = load_model(f"hf:{path}").weights
    assert first.startswith("sha256:") and load_model(f"hf:{path}").weights == first
    torch.manual_seed(1)
    transformers.ViTModel(transformers.AutoConfig.from_pretrained(path)).save_pretrained(path)
    assert load_model(f"hf:{path}").weights != first


def test_source_hf_dual_tower_gives_vision_model(tmp_path):
    path = _tiny_hf_dir(tmp_path, dual=True)
    model = load_model(f"hf:{path}", pretrained=False)
    names = [n for n, _ in model.module.named_modules()]
    assert "encoder.layers.1" in names and "post_layernorm" in names
    assert not any("text" in n for n in names)  # only the image tower is kept
    assert model.input_size == (3, 64, 64)
    # the module's own output is a ModelOutput: the recorded tensor is its last_hidden_state
    x = _batch(model)
    with Extractor(model, ["output", "encoder.layers.1"]) as ex:
        out = ex(x)
    with torch.inference_mode():
        ref = model.module(x)
    assert torch.equal(out["output"], ref.last_hidden_state)


def test_source_custom_file_with_transform():
    model = load_model(f"custom:{TESTS / 'custom_models.py'}:cifar_cnn", pretrained=False)
    assert model.input_size == (3, 32, 32)
    out = _check_forward(model, "features.3", "flatten")
    assert out.shape == (2, 32 * 16 * 16)


def test_source_custom_module_factory(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    model = load_model("custom:custom_models:robust_resnet_tiny", pretrained=False)
    assert model.input_size == (3, 224, 224)  # no transform given: ImageNet preprocessing
    _check_forward(model, "stages.1.1")
    with pytest.raises(ModelSpecError, match="no factory 'nope'"):
        load_model("custom:custom_models:nope", pretrained=False)


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:alexnet", "clip:ViT-B-32", f"custom:{TESTS / 'custom_models.py'}:cifar_cnn"])
def test_transforms_pickle_for_dataloader_workers(spec):
    model = load_model(spec, pretrained=False)
    clone = pickle.loads(pickle.dumps(model.transform))
    img = _image(5)
    assert torch.equal(clone(img), model.transform(img))


def test_local_weights_torch_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(123)
    source = load_model("torchvision:alexnet", pretrained=False).module
    state = {k: v.clone() for k, v in source.state_dict().items()}
    pt = tmp_path / "alexnet.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pt)  # a wrapped DDP checkpoint
    st = tmp_path / "alexnet.safetensors"
    save_file(state, str(st))
    for path in (pt, st):
        model = load_model("torchvision:alexnet", weights=path)
        assert model.weights.startswith("sha256:")
        for k, v in model.module.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_local_weights_refuse_pickled_code_and_wrong_models(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": object()}, evil)
    with pytest.raises(WeightsUnavailableError, match="weights_only"):
        load_model("torchvision:alexnet", weights=evil)
    wrong = tmp_path / "wrong.pt"
    torch.save(load_model("timm:resnet18", pretrained=False).module.state_dict(), wrong)
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        load_model("torchvision:alexnet", weights=wrong)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_model("torchvision:alexnet", weights=tmp_path / "missing.pt")


def test_clip_weights_from_a_full_clip_checkpoint(tmp_path):
    import open_clip

    torch.manual_seed(7)
    full = open_clip.create_model("RN50", pretrained=None)
    path = tmp_path / "clip_full.pt"
    torch.save(full.state_dict(), path)  # keys "visual.*", "transformer.*", ...
    model = load_model("openclip:RN50", weights=path)
    assert torch.equal(model.module.conv1.weight, full.visual.conv1.weight)


def test_full_openclip_vit_checkpoint_loads_into_the_image_tower(tmp_path):
    """The text tower of a ViT CLIP has the image tower's key names (transformer.resblocks.*) with other
    shapes: the `visual.` sub-dict is the one that fits."""
    import open_clip

    torch.manual_seed(11)
    full = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path / "oc.pth"
    torch.save(full.state_dict(), path)
    model = load_model("openclip:ViT-B-32", weights=path)
    assert model.weights.startswith("sha256:")
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, full.visual.state_dict()[k]), k


def test_a_checkpoint_that_does_not_fit_gives_one_short_message(tmp_path):
    wrong = tmp_path / "resnet.pth"
    torch.save(load_model("torchvision:resnet18", pretrained=False).module.state_dict(), wrong)
    with pytest.raises(WeightsUnavailableError) as info:  # was torch's size-mismatch listing
        load_model("torchvision:alexnet", weights=wrong)
    message = str(info.value)
    assert len(message) < 800 and "keys missing" in message and "unexpected keys" in message
    assert "Likely cause: a checkpoint of a different architecture" in message
    # the same names with other shapes: another variant (alexnet with 10 classes)
    import torchvision

    torch.save(torchvision.models.alexnet(num_classes=10).state_dict(), other := tmp_path / "alexnet10.pth")
    with pytest.raises(WeightsUnavailableError, match="2 keys with other shapes.*classifier.6.weight.*another size") as info:
        load_model("torchvision:alexnet", weights=other)
    assert len(str(info.value)) < 800


def test_offline_download_failure_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE when imported: set the constant too, so no request is retried
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for spec in ("timm:resnet18", "openclip:RN50@openai"):
        with pytest.raises(WeightsUnavailableError, match="weights=PATH") as info:
            load_model(spec)
        assert "pretrained=False" in str(info.value)  # the library names its parameters ...
        from neuropredictor.cli import as_flags

        assert "--weights PATH" in as_flags(str(info.value)) and "--no-pretrained" in as_flags(str(info.value))
    # hf builds random weights from the hub's config: "use --no-pretrained" was the advice when it was given
    with pytest.raises(WeightsUnavailableError, match=r"the config of hf:google/vit-base-patch16-224, which its "
                                                      r"random weights are built from too") as info:
        load_model("hf:google/vit-base-patch16-224", pretrained=False)
    assert "pretrained=False" not in str(info.value) and "hf:/path/to/model" in str(info.value)
    # open_clip's NLLB text tower reads its config from the hub: a raw OSError traceback
    with pytest.raises(WeightsUnavailableError, match=r"the config of openclip:nllb-clip-base-siglip"):
        load_model("openclip:nllb-clip-base-siglip", pretrained=False)


def test_list_models():
    assert "timm:resnet50" in list_models("timm", "resnet5*")
    tv = list_models("torchvision", "alexnet*")
    assert "torchvision:alexnet" in tv and "torchvision:alexnet@IMAGENET1K_V1" in tv
    assert "clip:ViT-B-32" in list_models("clip")
    assert "openclip:ViT-B-32@laion2b_s34b_b79k" in list_models("openclip", "ViT-B-32@*")


def test_cli_models_json():
    from typer.testing import CliRunner

    from neuropredictor.cli import app

    result = CliRunner().invoke(app, ["models", "--source", "torchvision", "resnet50*", "--json"])
    assert result.exit_code == 0, result.output
    specs = json.loads(result.output)
    assert "torchvision:resnet50@IMAGENET1K_V2" in specs


def test_random_weights_are_reproducible_and_leave_the_callers_rng_alone():
    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    a = load_model("timm:resnet18", pretrained=False).module.state_dict()
    after = torch.rand(3)
    b = load_model("timm:resnet18", pretrained=False).module.state_dict()
    assert torch.equal(after, expected_next)  # load_model did not consume the caller's random stream
    assert all(torch.equal(a[k], b[k]) for k in a)  # every process builds the same "random" model


def test_pretrained_weights_from_an_unreachable_hub_fail_fast_with_the_fix(tmp_path, monkeypatch):
    """Offline, the hub client used to retry for about a minute before the error; now the cache is asked at
    once (an empty one here) and the error names the ways out."""
    import time

    from huggingface_hub import constants as hub

    from neuropredictor.errors import WeightsUnavailableError
    from neuropredictor.models import load_model

    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="pretrained=False") as info:
        load_model("timm:resnet18", pretrained=True)
    assert time.monotonic() - t0 < 15
    assert "weights=PATH" in str(info.value) and not hub.HF_HUB_OFFLINE  # offline mode only for that call


def test_the_hub_counts_as_reachable_through_the_environments_proxy(monkeypatch):
    # Compute nodes of a cluster often reach the internet only through HTTPS_PROXY: probing the hub's own
    # host found it unreachable and forced offline mode, so pretrained downloads failed although they work.
    import socket

    from neuropredictor.models.base import _reachable

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    hub = "https://127.0.0.1:9"  # nothing listens on port 9
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        _reachable.cache_clear()
        assert not _reachable(hub)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        _reachable.cache_clear()
        assert _reachable(hub)
    _reachable.cache_clear()


def test_state_digest_names_weights_by_their_values_whatever_the_state_holds():
    # a custom factory's weights are named by this digest: extra state (any object) and bfloat16 or bool
    # buffers crashed it ('dict' object has no attribute 'detach')
    from torch import nn

    from neuropredictor.models.base import state_digest

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.register_buffer("scale", torch.ones(2, dtype=torch.bfloat16))
            self.register_buffer("mask", torch.tensor([True, False]))

        def get_extra_state(self) -> dict:
            return {"classes": ["a", "b"]}

        def set_extra_state(self, state: dict) -> None:
            pass

    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    assert state_digest(a) == state_digest(b) and state_digest(a).startswith("state-sha256:")
    with torch.no_grad():
        b.scale[0] = 2.0  # a bfloat16 value: another model
    assert state_digest(a) != state_digest(b)
