"""decode="device": encoded bytes from the shard reader, decoding and the model's preprocessing as tensor ops.

On this CPU-only machine the "device" is the CPU (torchvision's libjpeg decoder, tensor resizing); the
same code runs nvJPEG on a GPU (the `gpu` test). Reference: the PIL path the CPU decode workers run.

Tolerance, stated once: decoding is bit-identical to PIL on the CPU (both libjpeg); resizing is not
(torch's antialiased resize rounds differently from PIL's), by at most a few grey levels per pixel.
So preprocessed pixels agree within 3 grey levels (3/255 in [0, 1] units, divided by the normalisation's
std), and within 0.3 grey levels on average.
"""

from __future__ import annotations

import io
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from conftest import MODEL, key_files, make_images
from custom_models import cifar_cnn
from neuropredictor.corpus import list_shards, make_shards, read_shard
from neuropredictor.corpus.decode import MachineError
from neuropredictor.device_decode import DeviceDecoder, tensor_steps
from neuropredictor.errors import ConfigMismatchError, NeuroPredictorError
from neuropredictor.models import load_model
from neuropredictor.models.hf import processor_transform
from neuropredictor import ExtractConfig, plan, run
from neuropredictor.store import open_features

MAX_LEVELS = 3 / 255
MEAN_LEVELS = 0.3 / 255


def _natural(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: resizing has real work to do, unlike pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 3) % 256, (yy * 2) % 256, (xx + yy) % 256], -1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, subsampling: int = -1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, subsampling=subsampling)
    return buf.getvalue()


def _hf_transform(**attrs):
    # the attributes of a ViT image processor (what processor_transform reads)
    proc = types.SimpleNamespace(**{"size": {"height": 224, "width": 224}, "resample": 2, "do_resize": True,
                                    "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
                                    "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                                    **attrs})
    return processor_transform(proc)


TRANSFORMS = {
    "timm": lambda: load_model("timm:resnet18", pretrained=False).transform,
    "torchvision-preset": lambda: load_model("torchvision:resnet18", pretrained=False).transform,
    "openclip": lambda: load_model("openclip:ViT-B-32", pretrained=False).transform,
    "hf": _hf_transform,
    # CLIP's and EfficientNet's: HF's own centre crop, offset to [-1, 1], the std twice, BGR
    "hf-crop": lambda: _hf_transform(size={"shortest_edge": 160}, do_center_crop=True,
                                     crop_size={"height": 128, "width": 128}, rescale_offset=True,
                                     include_top=True, do_flip_channel_order=True),
    "custom-v2": lambda: cifar_cnn()[1],
    # PIL's nearest is torch's NEAREST_EXACT, not its NEAREST
    "nearest": lambda: T.Compose([T.Resize(160, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(128),
                                  T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)]),
}


@pytest.mark.parametrize("source", sorted(TRANSFORMS))
def test_tensor_preprocessing_matches_pil(source):
    from torchvision.io import ImageReadMode, decode_jpeg

    transform = TRANSFORMS[source]()
    steps = tensor_steps(transform)
    std = min(float(s) for s in torch.as_tensor(next(t for t in steps if type(t).__name__ == "_Normalize").std))
    for i, (w, h) in enumerate([(400, 300), (61, 47), (224, 224), (300, 500)]):
        data = _jpeg(_natural(w, h, i))
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert torch.equal(decoded.permute(1, 2, 0), torch.from_numpy(np.array(pil)))
        want = transform(pil)
        got = decoded
        for step in steps:
            got = step(got)
        assert got.shape == want.shape and got.dtype == torch.float32
        diff = (got - want).abs()
        assert diff.max().item() <= MAX_LEVELS / std + 1e-6, (source, (w, h), diff.max().item())
        assert diff.mean().item() <= MEAN_LEVELS / std, (source, (w, h), diff.mean().item())


def test_untranslatable_step_is_refused_by_name():
    transform = v2.Compose([v2.Resize(40), v2.Grayscale(3), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    with pytest.raises(NeuroPredictorError, match=r"Grayscale.*decode='cpu'"):
        tensor_steps(transform)
    # resampling tensors cannot do: refused at start, not as an invalid row per image
    with pytest.raises(NeuroPredictorError, match=r"box.*decode='cpu'"):
        tensor_steps(T.Compose([T.Resize(40, interpolation=T.InterpolationMode.BOX), T.ToTensor()]))


def test_bad_samples_stay_invalid_and_good_ones_match_pil(tmp_path):
    images = tmp_path / "imgs"
    make_images(images, 9, size=(60, 50), nested=False)  # jpg, png and webp in turn
    (images / "img0003.jpg").write_bytes((images / "img0003.jpg").read_bytes()[:200])  # truncated JPEG
    (images / "img0006.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    (images / "img0004.png").write_bytes(b"")  # empty member: found by the reader already
    make_shards(images, str(tmp_path / "shards"), maxcount=9)
    shard = list_shards(str(tmp_path / "shards"))[0]
    model = load_model(MODEL, pretrained=False)
    decoder = DeviceDecoder(model.transform, "cpu", model.input_size)

    raw = list(read_shard(shard, None, batch_size=4, num_workers=2))
    assert [len(b) for b in raw] == [4, 4, 1] and all(b.images is None and b.data is not None for b in raw)
    batches = [decoder(b) for b in raw]
    keys = [k for b in batches for k in b.keys]
    valid = torch.cat([b.valid for b in batches])
    errors = {k: v for b in batches for k, v in b.errors.items()}
    assert sorted(errors) == ["img0003", "img0004", "img0006"]
    assert "0 bytes" in errors["img0004"] and "decode" in errors["img0003"] and "decode" in errors["img0006"]
    assert [k for k, ok in zip(keys, valid) if not ok] == ["img0003", "img0004", "img0006"]
    images_out = torch.cat([b.images for b in batches])
    files = key_files(images)
    for row, key in enumerate(keys):
        if not valid[row]:
            assert not images_out[row].any()  # zeros, as on the CPU path
            continue
        want = model.transform(Image.open(files[key]).convert("RGB"))  # png and webp go through the CPU fallback
        assert (images_out[row] - want).abs().max().item() <= MAX_LEVELS / 0.224 + 1e-6


def test_device_memory_full_while_preprocessing_fails_the_batch_not_the_image(tmp_path, monkeypatch):
    # review: the device running out of memory while resizing made the image an invalid row of a committed shard
    make_images(tmp_path / "imgs", 2, size=(60, 50), nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=2)
    model = load_model(MODEL, pretrained=False)
    decoder = DeviceDecoder(model.transform, "cpu", model.input_size)
    raw = next(iter(read_shard(list_shards(str(tmp_path / "shards"))[0], None, batch_size=2, num_workers=0)))

    def full(img):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(decoder, "_preprocess", full)
    with pytest.raises(MachineError, match=r"sample img000[01]: OutOfMemoryError: CUDA out of memory"):
        decoder(raw)

    # nvJPEG out of memory (a batch of big JPEGs beside a big model): decoded on the CPU instead, as a JPEG nvJPEG
    # rejects is, not a failed shard every retry would fail alike (review of the first version)
    def nvjpeg_full(data):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

    monkeypatch.setattr(decoder, "_decode_jpegs", nvjpeg_full)
    arr = _natural(60, 50, 0)
    errors: dict = {}
    out = decoder._decode_all({0: _jpeg(arr)}, errors)
    assert not errors and out[0].shape == (3, 50, 60)
    np.testing.assert_array_equal(out[0].permute(1, 2, 0).numpy(), np.asarray(Image.open(io.BytesIO(_jpeg(arr)))))
    # torch's CPU allocator says so in a plain RuntimeError: the machine's failure too
    from neuropredictor.corpus.decode import machine_failure

    assert machine_failure(RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate "
                                        "memory: you tried to allocate 137438953472 bytes"))


def test_workers_leave_the_device_only_jpegs_it_may_decode_as_stored(tmp_path):
    """The DataLoader workers look at each header: a plain JPEG stays bytes (the device decodes it), a PNG
    and a JPEG with an EXIF rotation arrive decoded as the CPU path decodes them, so the thread feeding the
    device never opens an image with PIL."""
    from neuropredictor.corpus.decode import decode_pil

    images = tmp_path / "imgs"
    images.mkdir()
    plain, turned = Image.fromarray(_natural(40, 30, 0)), Image.fromarray(_natural(40, 30, 1))
    plain.save(images / "a.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    turned.save(images / "b.jpg", quality=90, exif=exif.tobytes())
    plain.save(images / "c.png")
    # nvJPEG decodes progressive JPEGs on the host one at a time, and a CMYK one fails its whole batch
    plain.save(images / "d.jpg", quality=90, progressive=True)
    plain.convert("CMYK").save(images / "e.jpg", quality=90)
    plain.convert("L").save(images / "f.jpg", quality=90)
    make_shards(images, str(tmp_path / "shards"), maxcount=6)
    (batch,) = read_shard(list_shards(str(tmp_path / "shards"))[0], None, batch_size=6, num_workers=1)
    assert batch.keys == ["a", "b", "c", "d", "e", "f"]
    assert batch.data[0] == (images / "a.jpg").read_bytes() and batch.data[5] == (images / "f.jpg").read_bytes()
    for j, name in ((1, "b.jpg"), (2, "c.png"), (3, "d.jpg"), (4, "e.jpg")):
        # an array, pickled out of the worker (a tensor per image would hold a file descriptor each)
        assert isinstance(batch.data[j], np.ndarray) and batch.data[j].dtype == np.uint8
        np.testing.assert_array_equal(batch.data[j], np.asarray(decode_pil((images / name).read_bytes())))
    assert batch.data[1].shape == (40, 30, 3)  # turned: 30 wide, 40 high as displayed


def test_a_jpeg_without_its_end_marker_is_decoded_by_the_workers():
    # its header reads fine, so it went to the device as bytes: a GPU's batch decoder may return garbage
    # pixels for a truncated file instead of failing it; the workers' decoder names the problem
    from neuropredictor.corpus.decode import ImageError, decode_pil, for_device

    data = _jpeg(_natural(200, 150, 0))
    assert for_device(data) == data and for_device(data + b"\0" * 64) == data + b"\0" * 64  # padded: as stored
    with Image.open(io.BytesIO(data[: len(data) // 2])) as img:
        assert img.size == (200, 150)  # the header is whole
    with pytest.raises(ImageError, match="decode"):
        for_device(data[: len(data) // 2])
    trailer = for_device(data + b"camera maker's trailer")  # valid, with bytes after its end: decoded here
    assert isinstance(trailer, np.ndarray)
    np.testing.assert_array_equal(trailer, np.asarray(decode_pil(data)))


def test_a_batch_of_worker_decoded_images_fits_a_low_file_limit(tmp_path):
    """300 PNGs in one batch from a DataLoader worker, under a limit of 256 open files: the decoded images
    leave the worker pickled, not as one shared-memory tensor (and file descriptor) each."""
    import subprocess
    import sys

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(300):
        Image.fromarray(_natural(16, 12, i)).save(images / f"p{i:03d}.png")
    make_shards(images, str(tmp_path / "shards"), maxcount=300)
    script = f"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from neuropredictor.corpus import list_shards, read_shard
(batch,) = read_shard(list_shards({str(tmp_path / "shards")!r})[0], None, batch_size=300, num_workers=1)
print(int(batch.valid.sum()), len(batch.data))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["300", "300"], done.stderr[-2000:]


def _config(corpus, out, **kw) -> ExtractConfig:
    return ExtractConfig(corpus=str(corpus), model=MODEL, layers=["layer2", "layer4"],
                         reduce="layer2=pool:2,layer4=avgpool", out=str(out), pretrained=False, batch_size=4,
                         num_workers=1, **kw)


def test_extraction_with_device_decoding_agrees_and_is_its_own_identity(tmp_path):
    images = tmp_path / "imgs"
    make_images(images, 12, size=(80, 64), nested=False)
    make_shards(images, str(tmp_path / "shards"), maxcount=5)
    run(_config(tmp_path / "shards", tmp_path / "cpu.zarr"))
    manifest = run(_config(tmp_path / "shards", tmp_path / "device.zarr", decode="device"))
    assert manifest["config"]["decode"] == "device" and manifest["rows"]["valid"] == 12
    assert all("device_decode_s" in s["stages"] for s in manifest["shards"])
    a, b = open_features(str(tmp_path / "cpu.zarr")), open_features(str(tmp_path / "device.zarr"))
    assert list(a["key"].values) == list(b["key"].values)
    for layer in ("layer2", "layer4"):
        x, y = a[layer].values, b[layer].values
        # a few grey levels of input difference, carried through a random-weight resnet18
        assert np.linalg.norm(x - y) / np.linalg.norm(x) < 1e-2, layer
    assert not np.array_equal(a["layer4"].values, b["layer4"].values)  # two paths indeed (PIL vs tensor resize)
    # a store made with one decoder is not resumed with the other: the numbers would mix
    with pytest.raises(ConfigMismatchError, match="decode"):
        plan(_config(tmp_path / "shards", tmp_path / "device.zarr"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_batch_matches_cpu_decoding():
    model = load_model("timm:resnet18", pretrained=False)
    cpu = DeviceDecoder(model.transform, "cpu", model.input_size)
    gpu = DeviceDecoder(model.transform, "cuda", model.input_size)
    from neuropredictor.corpus import Batch

    sizes = [(400, 300), (320, 240), (500, 375), (224, 224)]
    # 4:4:4 (full-resolution colour): nvJPEG's IDCT differs from libjpeg's by a grey level or two. 4:2:0, what
    # cameras and PIL write by default: nvJPEG upsamples the colour planes by repeating them, libjpeg smoothly,
    # so colour edges differ more; torchvision's own test allows 2 grey levels on average
    for subsampling, mean_levels, max_levels in ((0, 0.3, 8), (2, 2, None)):
        data = [_jpeg(_natural(w, h, i), subsampling) for i, (w, h) in enumerate(sizes)]
        data[2] = data[2][:100]  # one broken file (its frame header cut) must not cost the batch
        batch = Batch(index=torch.arange(4), keys=[f"k{i}" for i in range(4)], images=None,
                      valid=torch.ones(4, dtype=torch.bool), data=data)
        a, b = cpu(batch), gpu(batch)
        assert b.images.is_cuda and b.valid.tolist() == a.valid.tolist() == [True, True, False, True]
        diff = (b.images.cpu() - a.images).abs() * 0.224 * 255  # in grey levels (resnet's smallest std)
        print(f"nvJPEG vs libjpeg, subsampling={subsampling}: mean {diff.mean():.3f}, max {diff.max():.2f} grey levels")
        assert diff.mean().item() < mean_levels and (max_levels is None or diff.max().item() < max_levels)
