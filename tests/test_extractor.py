"""Hooked extraction against independent computations; early exit; precision; reductions; SRP."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from neuropredictor.errors import ReductionError
from neuropredictor.extractor import Extractor
from neuropredictor.layers import describe_layers
from neuropredictor.models import LoadedModel, load_model
from neuropredictor.models.spec import parse_spec
from neuropredictor.reduce import parse_reduce_option, parse_reduction, srp_matrix


@pytest.fixture(scope="module")
def alexnet():
    torch.manual_seed(0)
    return load_model("torchvision:alexnet", pretrained=False)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return load_model("torchvision:resnet18", pretrained=False)


def _x(n=3, size=224, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_alexnet_layers_equal_the_network_applied_by_hand(alexnet):
    net = alexnet.module
    x = _x()
    layers = ["features.0", "features.4", "features.12", "avgpool", "classifier.2", "classifier.6"]
    with Extractor(alexnet, layers) as ex:
        got = ex(x)
    with torch.inference_mode():
        # features[:k] as fresh Sequentials; ReLU(inplace) there mutates nothing we compare against
        assert torch.equal(got["features.0"], net.features[:1](x))
        assert torch.equal(got["features.4"], net.features[:5](x))
        f = net.features(x)
        assert torch.equal(got["features.12"], f)
        pooled = net.avgpool(f)
        assert torch.equal(got["avgpool"], pooled)
        flat = torch.flatten(pooled, 1)
        assert torch.equal(got["classifier.2"], F.relu(F.linear(flat, net.classifier[1].weight, net.classifier[1].bias)))
        assert torch.equal(got["classifier.6"], net(x))


def test_vit_blocks_equal_timm_forward_intermediates():
    torch.manual_seed(0)
    model = load_model("timm:vit_tiny_patch16_224", pretrained=False)
    x = _x(2)
    with Extractor(model, "blocks.*") as ex:
        got = ex(x)
    with torch.inference_mode():
        inter = model.module.forward_intermediates(x, indices=12, output_fmt="NLC", intermediates_only=True,
                                                   return_prefix_tokens=True)
    assert len(got) == 12
    for k, (spatial, prefix) in enumerate(inter):
        assert torch.equal(got[f"blocks.{k}"], torch.cat([prefix, spatial], dim=1)), k


def test_openclip_visual_output_and_blocks():
    torch.manual_seed(0)
    model = load_model("openclip:ViT-B-32", pretrained=False)
    x = _x(2)
    with Extractor(model, ["transformer.resblocks.5", "output"], early_exit=False) as ex:
        got = ex(x)
    with torch.inference_mode():
        assert torch.equal(got["output"], model.module(x))  # open_clip's own image embedding
        inter = model.module.forward_intermediates(x, indices=[5], output_fmt="NLC", intermediates_only=True,
                                                   output_extra_tokens=True)
    tokens = torch.cat([inter["image_intermediates_prefix"][0], inter["image_intermediates"][0]], dim=1)
    assert torch.allclose(got["transformer.resblocks.5"], tokens, atol=1e-6)


def test_shared_module_records_its_last_call(resnet18):
    # torchvision's BasicBlock applies one `relu` twice; its last call is the block's output
    x = _x(2)
    with Extractor(resnet18, ["layer1.0.relu", "layer1.0"]) as ex:
        got = ex(x)
    assert torch.equal(got["layer1.0.relu"], got["layer1.0"])


def test_early_exit_same_tensors_and_skips_the_rest(resnet18):
    x = _x(2)
    layers = ["layer1", "layer2.0.conv1"]
    early_ex = Extractor(resnet18, layers, reduce="full")
    full_ex = Extractor(resnet18, layers, reduce="full", early_exit=False)
    later_calls = []  # registered after the extractors' own layer discovery pass
    handle = resnet18.module.layer4.register_forward_hook(lambda *a: later_calls.append(1))
    try:
        with early_ex:
            early = early_ex(x)
        assert later_calls == []  # the forward pass stopped after layer2.0.conv1
        with full_ex:
            full = full_ex(x)
        assert later_calls == [1]
    finally:
        handle.remove()
    for k in early:
        assert torch.equal(early[k], full[k])


def test_hooks_removed_on_exit(resnet18):
    with Extractor(resnet18, ["layer1", "fc"]):
        assert resnet18.module.layer1._forward_hooks
    assert not resnet18.module.layer1._forward_hooks and not resnet18.module.fc._forward_hooks
    with pytest.raises(RuntimeError, match="context manager"):
        Extractor(resnet18, ["layer1"])(_x(1))


def test_inside_the_with_block_the_model_runs_as_itself(resnet18):
    # the hooks recorded (and stopped the pass with a bare internal exception) on every forward pass of the
    # module, not just the Extractor's: the model called by hand, a second Extractor, describe_layers
    x = _x(2)
    with torch.no_grad():
        logits = resnet18.module(x)
    with Extractor(resnet18, ["layer1"]) as first:
        with torch.no_grad():
            assert torch.equal(resnet18.module(x), logits)  # ran to the end, hooks silent
        describe_layers(resnet18)
        with Extractor(resnet18, ["layer4"], reduce="avgpool") as second:
            a, b = first(x)["layer1"], second(x)["layer4"]
    with Extractor(resnet18, ["layer1"]) as alone1, torch.no_grad():
        ref1 = alone1(x)["layer1"]
    with Extractor(resnet18, ["layer4"], reduce="avgpool") as alone4:
        ref4 = alone4(x)["layer4"]
    assert torch.equal(a, ref1) and torch.equal(b, ref4)


def test_features_are_ordinary_tensors_and_bad_batches_say_how_to_make_one(resnet18):
    from neuropredictor.errors import NeuroPredictorError

    with Extractor(resnet18, ["layer4"], reduce="avgpool") as ex:
        f = ex(_x(4))["layer4"]
        probe = torch.nn.Linear(512, 3)
        probe(f).sum().backward()  # a linear probe on the features: inference tensors refused this
        assert probe.weight.grad is not None and not f.requires_grad
        f -= f.mean(0)  # in place, as numpy users do
        assert torch.allclose(f.mean(0), torch.zeros(512), atol=1e-5)
        with pytest.raises(NeuroPredictorError, match="tensor batch.*not a list.*model.transform"):
            ex([_x(1)[0]])
        with pytest.raises(NeuroPredictorError, match=r"shape \(3, 224, 224\).*image\[None\]"):
            ex(_x(1)[0])
        assert torch.allclose(ex(_x(2).double())["layer4"], ex(_x(2))["layer4"])  # float64: as float32


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_within_tolerance(resnet18, precision):
    # Stated tolerance: relative L2 error of each layer's features <= 5e-2 under bf16/fp16 autocast
    x = _x(2)
    with Extractor(resnet18, ["layer2", "layer4"], reduce="avgpool") as ex:
        ref = ex(x)
    with Extractor(resnet18, ["layer2", "layer4"], reduce="avgpool", precision=precision) as ex:
        low = ex(x)
    for k in ref:
        assert low[k].dtype == torch.float32
        rel = (low[k] - ref[k]).norm() / ref[k].norm()
        assert 0 < rel < 5e-2, (k, rel)


def test_channels_last_matches(resnet18):
    x = _x(2)
    with Extractor(resnet18, ["layer3"], reduce="full") as ex:
        ref = ex(x)["layer3"]
    with Extractor(resnet18, ["layer3"], reduce="full", channels_last=True) as ex:
        got = ex(x)["layer3"]
    resnet18.module.to(memory_format=torch.contiguous_format)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_reductions_equal_independent_formulas(resnet18):
    x = _x(2)
    with Extractor(resnet18, ["layer3"], reduce="full") as ex:
        fmap = ex(x)["layer3"]
    cases = {
        "flatten": fmap.reshape(2, -1),
        "avgpool": fmap.mean(dim=(2, 3)),
        "pool:2": torch.stack([torch.stack([fmap[:, :, i * 7:(i + 1) * 7, j * 7:(j + 1) * 7].mean(dim=(2, 3))
                                            for j in range(2)], -1) for i in range(2)], -2),
    }
    for red, ref in cases.items():
        with Extractor(resnet18, ["layer3"], reduce=red) as ex:
            got = ex(x)["layer3"]
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5), red


def test_channels_last_maps_are_pooled_over_height_and_width():
    # Swin's stages and ConvNeXt's inner blocks give (B, H, W, C) maps: pooling the trailing two dims of
    # those averaged over W and C and stored an (H,)-vector per image. Reference: the network by hand.
    torch.manual_seed(0)
    swin = load_model("torchvision:swin_t", pretrained=False)
    x = _x(2)
    with torch.inference_mode():
        stage = swin.module.features[:4](x)  # (B, 28, 28, 192)
    k = stage.shape[1] // 2
    infos = {i.name: i for i in describe_layers(swin)}
    assert infos["features.3"].channels_last and not infos["features.0.0"].channels_last  # a Conv2d
    with Extractor(swin, ["features.3"], reduce="avgpool") as ex:
        assert torch.allclose(ex(x)["features.3"], stage.mean(dim=(1, 2)), atol=1e-5)
    with Extractor(swin, ["features.3"], reduce="pool:2") as ex:
        got = ex(x)["features.3"]
    ref = torch.stack([torch.stack([stage[:, i * k:(i + 1) * k, j * k:(j + 1) * k].mean(dim=(1, 2))
                                    for j in range(2)], -1) for i in range(2)], -2)
    assert got.shape == (2, 192, 2, 2) and torch.allclose(got, ref, atol=1e-5)
    with Extractor(swin, ["features.3"], reduce="full") as ex:
        assert torch.equal(ex(x)["features.3"], stage)  # stored as the model gives it

    convnext = load_model("torchvision:convnext_tiny", pretrained=False)
    infos = {i.name: i for i in describe_layers(convnext)}
    assert infos["features.1.0.block.3"].channels_last and not infos["features.1.0"].channels_last


def test_layout_of_a_map_with_as_many_channels_as_pixels_a_side():
    # ConvNeXt-T at 384 px: stage 0 is (96, 96, 96). Its blocks' inner Linear is (H, W, C) of the same shape,
    # and the blocks (channels first) took its layout: avgpool averaged over C and H.
    torch.manual_seed(0)
    model = load_model("timm:convnext_tiny.fb_in22k_ft_in1k_384", pretrained=False)
    x = torch.randn(2, *model.input_size)
    with torch.inference_mode():
        stage = model.module.stages[0](model.module.stem(x))  # (B, 96, 96, 96), channels first
    infos = {i.name: i for i in describe_layers(model)}
    assert infos["stages.0.blocks.0.mlp.fc2"].channels_last
    assert not any(infos[n].channels_last for n in ("stem", "stem.1", "stages.0", "stages.0.blocks.2"))
    with Extractor(model, ["stages.0"], reduce="avgpool") as ex:
        assert torch.allclose(ex(x)["stages.0"], stage.mean(dim=(2, 3)), atol=1e-5)


def test_token_reductions():
    torch.manual_seed(0)
    model = load_model("timm:vit_tiny_patch16_224", pretrained=False)
    x = _x(2)
    with Extractor(model, ["blocks.3"], reduce="full") as ex:
        tokens = ex(x)["blocks.3"]
    with Extractor(model, ["blocks.3", "blocks.4"], reduce="blocks.3=cls,blocks.4=avgpool") as ex:
        got = ex(x)
    assert torch.equal(got["blocks.3"], tokens[:, 0])
    with Extractor(model, ["blocks.4"], reduce="full") as ex:
        assert torch.allclose(got["blocks.4"], ex(x)["blocks.4"].mean(dim=1), atol=1e-6)
    with pytest.raises(ReductionError, match="pool:K needs a conv map"):
        Extractor(model, ["blocks.3"], reduce="pool:2")
    # a sequence of patches alone (the patch embedding here; SigLIP's and Swin's blocks) has no class token:
    # cls took the top-left patch, silently
    with Extractor(model, ["patch_embed"], reduce="full") as ex:
        assert ex(x)["patch_embed"].shape == (2, 196, 192)
    with pytest.raises(ReductionError, match=r"196 tokens are a 14x14 grid of patches.*use avgpool"):
        Extractor(model, ["patch_embed"], reduce="cls")
    registers = load_model("timm:vit_small_patch14_reg4_dinov2", pretrained=False)  # 1 + 4 + 16 x 16 tokens
    assert Extractor(registers, ["blocks.0"], reduce="cls").plan["blocks.0"].out_shape == (384,)
    # registers without a class token (timm's *_reg4_gap_*): 4 + 14 x 14 tokens is not square, and the first
    # is a register; cls stored it
    import timm

    no_cls = LoadedModel(parse_spec("custom:x:y"), timm.create_model(
        "vit_tiny_patch16_224", class_token=False, reg_tokens=4, global_pool="avg").eval(),
        model.transform, model.input_size, "random")
    assert Extractor(no_cls, ["blocks.0"], reduce="avgpool").plan["blocks.0"].in_shape == (200, 192)
    with pytest.raises(ReductionError, match="built without one"):
        Extractor(no_cls, ["blocks.0"], reduce="cls")


def test_reduce_option_parsing():
    layers = ["layer3", "layer4", "fc"]
    got = parse_reduce_option("avgpool,layer3=pool:2,fc=full", layers)
    assert {k: str(v) for k, v in got.items()} == {"layer3": "pool:2", "layer4": "avgpool", "fc": "full"}
    # the last of two entries for one layer won, silently; a layer named exactly overrides a glob
    with pytest.raises(ReductionError, match=r"sets layer 'layer4' twice: layer\*=avgpool and l\*4=pool:2"):
        parse_reduce_option("layer*=avgpool,l*4=pool:2", layers)
    for text in ("layer4=avgpool,layer*=pool:2", "layer*=pool:2,layer4=avgpool"):
        assert {k: str(v) for k, v in parse_reduce_option(text, layers).items()} == {
            "layer3": "pool:2", "layer4": "avgpool", "fc": "full"}
    with pytest.raises(ReductionError, match=r"two reductions for every layer: 'avgpool' and 'pool:2'"):
        parse_reduce_option("avgpool,pool:2", layers)
    assert str(parse_reduce_option("layer4=avgpool,layer4=avgpool", layers)["layer4"]) == "avgpool"
    assert {str(v) for v in parse_reduce_option("srp:64", layers).values()} == {"srp:64"}
    with pytest.raises(ReductionError, match="not among the selected layers"):
        parse_reduce_option("layer9=avgpool", layers)
    for bad in ("mean", "pool", "srp:0", "cls:3"):
        with pytest.raises(ReductionError):
            parse_reduction(bad)


def test_one_glob_dialect_for_layers_and_reduce():
    """`blocks.*` means the same in `layers` and in `reduce`: one dotted segment (not blocks.0.attn)."""
    from neuropredictor.layers import select_layers

    names = ["blocks.0", "blocks.0.attn", "blocks.1", "blocks.1.attn", "head"]
    assert select_layers(names, "blocks.*") == ["blocks.0", "blocks.1"]
    got = parse_reduce_option("full,blocks.*=cls", names)
    assert {k: str(v) for k, v in got.items()} == {"blocks.0": "cls", "blocks.0.attn": "full", "blocks.1": "cls",
                                                  "blocks.1.attn": "full", "head": "full"}
    assert {k for k, v in parse_reduce_option("full,blocks.**=cls", names).items() if str(v) == "cls"} == {
        "blocks.0", "blocks.0.attn", "blocks.1", "blocks.1.attn"}


def test_srp_preserves_norms_and_depends_on_layer():
    w = srp_matrix("layer3", 5000, 512, seed=0)
    x = torch.randn(64, 5000)
    ratio = ((w @ x.T).T.norm(dim=1) / x.norm(dim=1))
    assert abs(ratio.mean().item() - 1) < 0.05
    dense = w.to_dense()
    assert 0.005 < (dense != 0).float().mean().item() < 0.03  # density ~ 1/sqrt(5000) = 0.014
    assert not torch.equal(dense, srp_matrix("layer4", 5000, 512, seed=0).to_dense())
    assert not torch.equal(dense, srp_matrix("layer3", 5000, 512, seed=1).to_dense())
    assert torch.equal(dense, srp_matrix("layer3", 5000, 512, seed=0).to_dense())


_SRP_CHILD = """
import hashlib, torch
from neuropredictor.reduce import srp_matrix, parse_reduction, apply
w = srp_matrix("blocks.7", 37632, 256, seed=3)
x = torch.arange(2 * 37632, dtype=torch.float32).reshape(2, 37632) / 37632
y = apply(parse_reduction("srp:256"), x, w)
h = hashlib.sha256()
for t in (w.crow_indices(), w.col_indices(), w.values(), y):
    h.update(t.numpy().tobytes())
print(h.hexdigest())
"""


def test_srp_identical_across_processes():
    digests = {subprocess.run([sys.executable, "-c", _SRP_CHILD], capture_output=True, text=True, check=True).stdout.strip()
               for _ in range(2)}
    assert len(digests) == 1 and len(digests.pop()) == 64


def test_srp_through_the_extractor(resnet18):
    x = _x(2)
    with Extractor(resnet18, ["layer2"], reduce="full") as ex:
        fmap = ex(x)["layer2"]
    with Extractor(resnet18, ["layer2"], reduce="srp:128", srp_seed=5) as ex:
        got = ex(x)["layer2"]
    w = srp_matrix("layer2", fmap[0].numel(), 128, seed=5)
    assert torch.allclose(got, (w.to_dense() @ fmap.reshape(2, -1).T).T, atol=1e-3, rtol=1e-4)


def test_layer_that_never_runs_is_refused():
    from neuropredictor.errors import LayerNotFoundError

    torch.manual_seed(0)
    model = load_model("torchvision:inception_v3", pretrained=False)  # its aux classifier runs only in training
    infos = {i.name: i for i in describe_layers(model)}
    assert infos["AuxLogits"].calls == 0
    with pytest.raises(LayerNotFoundError, match="does not run"):
        Extractor(model, ["AuxLogits"], layer_infos=list(infos.values()))


def test_fp32_turns_tf32_off_and_leaves_torchs_flags_readable():
    # set through the newer API first (as a user's notebook may): setting the legacy flags must not leave a
    # mix that makes torch refuse to read them
    from neuropredictor.extractor import ieee_fp32

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        ieee_fp32()
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cudnn.conv.fp32_precision != "tf32"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(resnet18):
    x = _x(2)
    with Extractor(resnet18, ["layer3", "fc"], reduce="avgpool") as ex:
        ref = ex(x)
    with Extractor(resnet18, ["layer3", "fc"], reduce="avgpool", device="cuda") as ex:
        got = {k: v.cpu() for k, v in ex(x).items()}
    with Extractor(resnet18, ["layer3", "fc"], reduce="avgpool", device="cuda", precision="bf16", channels_last=True) as ex:
        low = {k: v.cpu() for k, v in ex(x).items()}
    resnet18.module.to("cpu", memory_format=torch.contiguous_format)
    for k in ref:
        # fp32 is fp32 on the GPU too (TF32 convolutions, torch's default, are 1e-3 off: `ieee_fp32`)
        assert (got[k] - ref[k]).norm() / ref[k].norm() < 1e-4, k
        assert (low[k] - ref[k]).norm() / ref[k].norm() < 5e-2


def test_compiled_forward_equals_the_network_by_hand_and_compiles_once():
    """torch.compile (inductor, on the CPU here) with hooks: one graph of the whole forward pass (the early
    exit's exception broke it into one per block), the same numbers as the eager modules applied by hand; a
    smaller last batch is padded, so it does not compile a second graph."""
    from torch._dynamo.utils import counters

    from custom_models import cifar_cnn

    torch._dynamo.reset()
    torch.manual_seed(0)
    net, transform = cifar_cnn()
    model = LoadedModel(parse_spec("custom:custom_models:cifar_cnn"), net.eval(), transform, (3, 32, 32), "random")
    frames = counters["stats"]["unique_graphs"]
    with Extractor(model, ["features.2", "classifier.2"], compile=True) as ex:
        outs = [ex(_x(4, 32, seed=1)), ex(_x(3, 32, seed=2)), ex(_x(4, 32, seed=3))]
        compiled = counters["stats"]["unique_graphs"] - frames
    assert type(ex._forward).__name__ == "OptimizedModule"
    assert compiled == 1  # it really ran compiled, in one graph
    with torch.inference_mode():
        for got, seed, n in zip(outs, (1, 2, 3), (4, 3, 4)):
            x = _x(n, 32, seed=seed)
            f2 = net.features[:3](x)
            want = {"features.2": f2, "classifier.2": net.classifier[:3](net.features[3:](f2))}
            for k in want:
                assert got[k].shape == want[k].shape
                torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    # once warm (the hooks' graphs settle over the first two calls), a padded batch of 3 reuses the graphs;
    # a replica whose first batch is small (a short first shard) pads it to the batch size it was given:
    # full batches after it compiled again
    for batch_size, warm_up, then in ((None, 4, (3, 4)), (4, 2, (4, 3))):
        torch._dynamo.reset()
        with Extractor(model, ["features.2", "classifier.2"], compile=True, batch_size=batch_size) as ex:
            ex(_x(warm_up, 32))
            ex(_x(warm_up, 32))
            warm = counters["stats"]["unique_graphs"]
            for n in then:
                ex(_x(n, 32))
            assert counters["stats"]["unique_graphs"] == warm, batch_size
