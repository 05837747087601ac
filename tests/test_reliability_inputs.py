"""Bad inputs, table-driven (issue 13's probe): each case builds its input here and states the expected
outcome, one of
  - a clear error naming the problem (ERROR_CASES, through the library; CLI_CASES, through the CLI:
    exit code 2, one `error:` line, no traceback),
  - the sample kept as an invalid row with the reason (INVALID_CASES),
  - the right pixels, computed independently with numpy (PIXEL_CASES, on the CPU and the device path).
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images
from neuropredictor_flows.temporary_server import QUIET
from PIL import Image
from torchvision import transforms

from neuropredictor import ExtractConfig, open_features, pipeline
from neuropredictor import run as pipeline_run
from neuropredictor.corpus import (
    INDEX_FORMAT,
    INDEX_NAME,
    list_shards,
    make_shards,
    read_shard,
)
from neuropredictor.device_decode import DeviceDecoder
from neuropredictor.errors import CorpusError, NeuroPredictorError, ReductionError

CUSTOM = f"custom:{Path(__file__).parent / 'custom_models.py'}:cifar_cnn"


# --------------------------------------------------------------------------------------------------
# building inputs


def write_tar(path: Path, members: list[tuple[str | bytes, bytes]]) -> Path:
    """A tar with these (name, data) members, in order; a bytes name is written as is (any encoding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name if isinstance(name, str) else name.decode("utf-8", "surrogateescape"))
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_image(seed: int = 0, size: tuple[int, int] = (24, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def sample_shard(tmp: Path, data: bytes, ext: str = "png") -> Path:
    return write_tar(tmp / "shards" / "s-000000.tar", [(f"a.{ext}", data), ("a.json", b"{}")])


# --------------------------------------------------------------------------------------------------
# the right pixels


def _png16() -> tuple[bytes, np.ndarray]:
    wide = (np.arange(16 * 24, dtype=np.int64).reshape(16, 24) * 171).astype(np.uint16)  # 0 .. 65493
    img = Image.fromarray(wide)
    assert img.mode.startswith("I;16")
    grey = np.round(wide / 257.0).astype(np.uint8)  # v * 255 / 65535
    return encode(img), np.repeat(grey[..., None], 3, axis=2)


def _int32_tiff(top: int) -> Callable[[], tuple[bytes, np.ndarray]]:
    """32-bit integer greyscale ("I"), values 0..top: 8-bit values as they are, wider ones as 16-bit (review: an
    8-bit picture saved as int32 was scaled as 16-bit, stored almost black and valid)."""
    def build() -> tuple[bytes, np.ndarray]:
        values = np.linspace(0, top, 16 * 24).round().astype(np.int32).reshape(16, 24)
        img = Image.fromarray(values, "I")
        grey = values if top <= 255 else np.round(values.clip(0, 65535) / 257.0)
        return encode(img, "TIFF"), np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)

    return build


def _float_tiff(top: float) -> Callable[[], tuple[bytes, np.ndarray]]:
    def build() -> tuple[bytes, np.ndarray]:
        values = np.linspace(0, top, 16 * 24, dtype=np.float32).reshape(16, 24)
        img = Image.fromarray(values, "F")
        grey = np.rint(values.astype(np.float64) * (255 if top <= 1 else 1)).clip(0, 255).astype(np.uint8)
        return encode(img, "TIFF"), np.repeat(grey[..., None], 3, axis=2)

    return build


def _exif_rotated(fmt: str) -> Callable[[], tuple[bytes, np.ndarray]]:
    def build() -> tuple[bytes, np.ndarray]:
        arr = rgb_image(1)
        exif = Image.Exif()
        exif[0x0112] = 6  # displayed turned 90 degrees clockwise
        data = encode(Image.fromarray(arr), fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
        stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) if fmt == "JPEG" else arr
        return data, np.ascontiguousarray(np.rot90(stored, k=-1))

    return build


def _transparent(mode: str) -> Callable[[], tuple[bytes, np.ndarray]]:
    def build() -> tuple[bytes, np.ndarray]:
        rgb = rgb_image(2).astype(np.float64)
        alpha = np.random.default_rng(3).integers(0, 256, size=rgb.shape[:2]).astype(np.float64)
        if mode == "LA":
            rgb = np.repeat(rgb[..., :1], 3, axis=2)
            img = Image.fromarray(np.dstack([rgb[..., 0], alpha]).astype(np.uint8), "LA")
        else:
            img = Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA")
        a = alpha[..., None] / 255.0
        want = np.round(rgb * a + 128.0 * (1 - a)).astype(np.uint8)  # over mid-grey
        return encode(img), want

    return build


@dataclass(frozen=True)
class PixelCase:
    id: str
    build: Callable[[], tuple[bytes, np.ndarray]]  # (encoded image, expected uint8 (H, W, 3))
    ext: str = "png"
    atol: int = 0


PIXEL_CASES = [
    PixelCase("png-16-bit-greyscale-scaled-not-white", _png16),
    PixelCase("int32-tiff-of-8-bit-values-as-they-are", _int32_tiff(255), ext="tif"),
    PixelCase("int32-tiff-of-16-bit-values-scaled", _int32_tiff(65535), ext="tif"),
    PixelCase("int32-tiff-beyond-16-bit-clipped", _int32_tiff(100000), ext="tif"),
    PixelCase("float-tiff-in-0-1-scaled-not-black", _float_tiff(1.0), ext="tif"),
    PixelCase("float-tiff-in-0-255", _float_tiff(300.0), ext="tif"),
    PixelCase("png-exif-orientation", _exif_rotated("PNG")),
    PixelCase("jpeg-exif-orientation", _exif_rotated("JPEG"), ext="jpg"),
    PixelCase("rgba-over-mid-grey", _transparent("RGBA"), atol=1),
    PixelCase("la-over-mid-grey", _transparent("LA"), atol=1),
]

def as_is(h: int, w: int) -> transforms.Compose:
    """uint8 (3, h, w): the decoded pixels themselves (the crop only fixes the shape of the batch)."""
    return transforms.Compose([transforms.CenterCrop((h, w)), transforms.PILToTensor()])


@pytest.mark.parametrize("case", PIXEL_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("path", ["cpu", "device"])
def test_pixels(case: PixelCase, path: str, tmp_path: Path) -> None:
    data, want = case.build()
    url = str(sample_shard(tmp_path, data, case.ext))
    (shard,) = list_shards(url)
    if path == "cpu":
        (batch,) = read_shard(shard, as_is(*want.shape[:2]), batch_size=4)
        got = batch.images[0].permute(1, 2, 0).numpy()
    else:
        (raw,) = read_shard(shard, None, batch_size=4)
        batch = DeviceDecoder(as_is(*want.shape[:2]), "cpu", (3, *want.shape[:2]))(raw)
        got = np.round(batch.images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert bool(batch.valid[0]), batch.errors
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= case.atol


# --------------------------------------------------------------------------------------------------
# samples kept as invalid rows, with the reason


def _huge_png_header_only(width: int = 10000, height: int = 10000) -> bytes:
    """A PNG that claims width x height pixels with almost no data: decoding it would fail (and a whole
    one would take gigabytes as RGB); the size check reads the header only."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@dataclass(frozen=True)
class InvalidCase:
    id: str
    build: Callable[[Path], Path]  # -> a shard
    key: str
    reason: tuple[str, ...]  # words the recorded reason contains


def with_index(shard: Path, count: int) -> Path:
    """An index.json that counts the shard, as another tool could write it: the plan does not scan it."""
    index = {"format": INDEX_FORMAT, "shards": [{"name": shard.stem, "count": count}]}
    (shard.parent / INDEX_NAME).write_text(json.dumps(index))
    return shard


def _png(seed: int = 0) -> bytes:
    return encode(Image.fromarray(rgb_image(seed)))


INVALID_CASES = [
    InvalidCase("10000x10000-png-over-the-pixel-cap", lambda tmp: sample_shard(tmp, _huge_png_header_only()),
                "a", ("10000x10000", "Mpx", "limit")),
    InvalidCase("same-key-and-extension-twice-in-a-row-not-merged",
                lambda tmp: write_tar(tmp / "s.tar", [("a.png", _png(0)), ("a.png", _png(1)), ("b.png", _png(2))]),
                "a", ("a.png", "twice")),
    InvalidCase("same-key-again-later-in-the-shard",
                lambda tmp: with_index(write_tar(tmp / "s.tar", [("a.png", _png(0)), ("b.png", _png(1)), ("a.png", _png(2))]), 3),
                "a", ("'a'", "also sample 0")),  # the second "a"; an index, else the plan refuses the shard
    InvalidCase("member-name-not-utf8-named",
                lambda tmp: write_tar(tmp / "s.tar", [("a.png", _png(0)), (b"b\xff\xfe.png", _png(1))]),
                "b\\xff\\xfe", ("b\\xff\\xfe", "not valid UTF-8")),
]


@pytest.mark.parametrize("case", INVALID_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("path", ["cpu", "device"])
def test_invalid_sample(case: InvalidCase, path: str, tmp_path: Path) -> None:
    shards = list_shards(str(case.build(tmp_path)))
    batches = []
    for shard in shards:
        if path == "cpu":
            batches += list(read_shard(shard, as_is(16, 24), batch_size=4))
        else:
            batches += [DeviceDecoder(as_is(16, 24), "cpu", (3, 16, 24))(b) for b in read_shard(shard, None, batch_size=4)]
    errors = {k: v for b in batches for k, v in b.errors.items()}
    assert case.key in errors, errors
    for word in case.reason:
        assert word in errors[case.key]
    valid = [(k, bool(v)) for b in batches for k, v in zip(b.keys, b.valid)]
    assert [v for k, v in valid if k == case.key][-1] is False
    assert any(v for _, v in valid) or len(valid) == 1  # the other samples are still read


@pytest.mark.parametrize("path", ["cpu", "device"])
@pytest.mark.parametrize("width", [12000, 20000])  # 120 Mpx: PIL would warn; 200 Mpx: PIL would refuse, its way
def test_an_image_over_the_cap_gets_one_reason_and_no_pil_warning(width: int, path: str, tmp_path: Path) -> None:
    shard = sample_shard(tmp_path, _huge_png_header_only(width, 10000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (raw,) = read_shard(list_shards(str(shard))[0], None if path == "device" else as_is(16, 24), batch_size=4)
        batch = DeviceDecoder(as_is(16, 24), "cpu", (3, 16, 24))(raw) if path == "device" else raw
    reason = batch.errors["a"]
    assert "Mpx, over the limit of 64 Mpx" in reason and "Decompression" not in reason, reason
    assert f"{width * 10000 / 1e6:.1f} Mpx" in reason
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


# --------------------------------------------------------------------------------------------------
# clear errors, through the library


def _hidden_shard(tmp: Path) -> Callable[[], object]:
    make_images(tmp / "imgs", 4, nested=False)
    make_shards(tmp / "imgs", str(tmp / "shards"), maxcount=2)
    (tmp / "shards" / "shard-000001.tar").rename(tmp / "shards" / ".hidden-000.tar")
    return lambda: list_shards(str(tmp / "shards"))


def _dup_across_shards(tmp: Path) -> Callable[[], object]:
    write_tar(tmp / "c" / "x-000000.tar", [("a.png", _png(0)), ("b.png", _png(1))])
    write_tar(tmp / "c" / "x-000001.tar", [("c.png", _png(2)), ("a.png", _png(3))])
    return lambda: list_shards(str(tmp / "c"))


def _dup_within_shard(tmp: Path) -> Callable[[], object]:
    write_tar(tmp / "c" / "x-000000.tar", [("a.png", _png(0)), ("b.png", _png(1)), ("a.png", _png(2))])
    return lambda: list_shards(str(tmp / "c"))


def _dup_at_make(tmp: Path) -> Callable[[], object]:
    (tmp / "imgs").mkdir()
    (tmp / "imgs" / "cat.png").write_bytes(_png(0))
    (tmp / "imgs" / "cat.jpg").write_bytes(encode(Image.fromarray(rgb_image(1)), "JPEG"))
    return lambda: make_shards(tmp / "imgs", str(tmp / "shards"))


def _config(tmp: Path, corpus: Path, **kw) -> ExtractConfig:
    fields = dict(corpus=str(corpus), model=CUSTOM, layers=["features.5"], out=str(tmp / "out.zarr"),
                  pretrained=False, batch_size=2, num_workers=0, retries=0, retry_delay_seconds=0)
    return ExtractConfig(**(fields | kw))


def _empty_tars(tmp: Path) -> Callable[[], object]:
    write_tar(tmp / "c" / "x-000000.tar", [])
    write_tar(tmp / "c" / "x-000001.tar", [])
    return lambda: pipeline.plan(_config(tmp, tmp / "c"))


def _pool_larger_than_map(tmp: Path) -> Callable[[], object]:
    write_tar(tmp / "c" / "x-000000.tar", [("a.png", _png(0))])
    return lambda: pipeline.plan(_config(tmp, tmp / "c", reduce="pool:9"))  # features.5 is 32 x 8 x 8


@dataclass(frozen=True)
class ErrorCase:
    id: str
    build: Callable[[Path], Callable[[], object]]  # -> the call that must fail
    error: type[Exception]
    words: tuple[str, ...]  # the message names these


ERROR_CASES = [
    ErrorCase("hidden-shard-refused-at-plan", _hidden_shard, NeuroPredictorError, (".hidden-000.tar", "hidden", "rename")),
    ErrorCase("duplicate-key-across-shards-at-plan", _dup_across_shards, CorpusError,
              ("'a'", "x-000000.tar", "x-000001.tar", "unique")),
    ErrorCase("duplicate-key-within-a-shard-at-plan", _dup_within_shard, CorpusError, ("'a'", "twice in", "x-000000.tar")),
    ErrorCase("duplicate-key-at-shards-make", _dup_at_make, CorpusError, ("cat.jpg", "cat.png", "'cat'")),
    ErrorCase("corpus-of-empty-tars-at-plan", _empty_tars, CorpusError, ("no images", "2 shard(s)")),
    ErrorCase("pool-larger-than-the-map-at-plan", _pool_larger_than_map, ReductionError, ("pool:9", "8x8", "K <= 8")),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.id)
def test_clear_error(case: ErrorCase, tmp_path: Path) -> None:
    call = case.build(tmp_path)
    with pytest.raises(case.error) as info:
        call()
    message = str(info.value)
    for word in case.words:
        assert word in message, message
    assert not (tmp_path / "out.zarr").exists()  # refused before anything is written


# --------------------------------------------------------------------------------------------------
# nothing dropped or merged without a word


def test_shards_make_takes_tif_bmp_gif_and_lists_what_it_skipped(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from neuropredictor.cli import app

    imgs = tmp_path / "imgs"
    (imgs / ".git").mkdir(parents=True)
    arrays = {name: rgb_image(i) for i, name in enumerate(["a", "b", "c"])}
    Image.fromarray(arrays["a"]).save(imgs / "a.tif")
    Image.fromarray(arrays["b"]).save(imgs / "b.bmp")
    # a GIF of two frames, few colours (so the palette keeps them exactly): its first frame is the image
    few = (arrays["c"] // 64 * 64).astype(np.uint8)
    frames = [Image.fromarray(few).quantize(colors=64, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE),
              Image.fromarray(255 - few).quantize(colors=64, dither=Image.Dither.NONE)]
    frames[0].save(imgs / "c.gif", save_all=True, append_images=frames[1:])
    arrays["c"] = np.asarray(frames[0].convert("RGB"))
    (imgs / "notes.txt").write_text("not an image")
    (imgs / ".DS_Store").write_bytes(b"x")
    (imgs / ".git" / "x.png").write_bytes(_png(5))

    result = CliRunner().invoke(app, ["shards", "make", str(imgs), str(tmp_path / "shards")])
    assert result.exit_code == 0, result.output
    for words in (("skipped notes.txt", "not an image"), ("skipped .DS_Store", "hidden file"),
                  ("skipped .git/", "hidden folder")):
        assert any(all(w in line for w in words) for line in result.output.splitlines()), result.output

    (shard,) = list_shards(str(tmp_path / "shards"))
    (batch,) = read_shard(shard, as_is(16, 24), batch_size=8)
    assert batch.keys == ["a", "b", "c"] and bool(batch.valid.all()), batch.errors
    for j, key in enumerate(batch.keys):
        np.testing.assert_array_equal(batch.images[j].permute(1, 2, 0).numpy(), arrays[key])


def test_bad_member_name_costs_its_row_only(tmp_path: Path) -> None:
    """A non-UTF-8 name in a tar: the shard commits, that row is invalid with the name in the reason."""
    write_tar(tmp_path / "c" / "x-000000.tar", [("a.png", _png(0)), (b"b\xff.png", _png(1)), ("c.png", _png(2))])
    manifest = pipeline_run(_config(tmp_path, tmp_path / "c"))
    assert manifest["status"] == "complete"
    ds = open_features(str(tmp_path / "out.zarr"))
    assert list(ds["key"].values) == ["a", "b\\xff", "c"]
    assert ds["valid"].values.tolist() == [True, False, True]
    (bad,) = manifest["bad_samples"]
    assert "not valid UTF-8" in bad["reason"]


# --------------------------------------------------------------------------------------------------
# one `error:` line instead of a traceback, through the command line


def _small_corpus(tmp: Path) -> Path:
    write_tar(tmp / "c" / "x-000000.tar", [("a.png", _png(0)), ("b.png", _png(1))])
    return tmp / "c"


def _extract_args(tmp: Path, *extra: str, model: str = CUSTOM, layers: str = "features.5") -> list[str]:
    return ["extract", "--corpus", str(_small_corpus(tmp)), "--model", model, "--layers", layers,
            "--out", str(tmp / "out.zarr"), "--batch-size", "2", "--num-workers", "0", "--retries", "0", *extra]


def _cli_unwritable_out(tmp: Path) -> list[str]:
    args = _extract_args(tmp, "--no-pretrained")
    args[args.index("--out") + 1] = "/proc/neuropredictor-test/out.zarr"  # not writable, even by root
    return args


def _cli_garbage_safetensors(tmp: Path) -> list[str]:
    (tmp / "w.safetensors").write_bytes(b"this is not a safetensors file at all" * 10)
    return _extract_args(tmp, "--weights", str(tmp / "w.safetensors"))


def _cli_hf_pickle(tmp: Path) -> list[str]:
    import argparse

    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=16)
    model_dir = tmp / "hf-model"
    cfg.save_pretrained(model_dir)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    # an old-style checkpoint: a pickle holding more than tensors, which torch.load(weights_only=True) refuses
    torch.save({"state_dict": transformers.ViTModel(cfg).state_dict(), "args": argparse.Namespace(lr=0.1)},
               model_dir / "pytorch_model.bin")
    return _extract_args(tmp, model=f"hf:{model_dir}", layers="encoder")


def _cli_read_only_folder(tmp: Path) -> list[str]:
    args = _extract_args(tmp, "--no-pretrained")
    (tmp / "read-only").mkdir()
    (tmp / "read-only").chmod(0o555)
    args[args.index("--out") + 1] = str(tmp / "read-only" / "out.zarr")
    return args


@dataclass(frozen=True)
class CliCase:
    id: str
    build: Callable[[Path], list[str]]  # -> the command line
    words: tuple[str, ...]
    skip: str | None = None


CLI_CASES = [
    CliCase("unwritable-output-folder", _cli_unwritable_out, ("cannot write the output store", "--out")),
    CliCase("read-only-output-folder", _cli_read_only_folder, ("cannot write the output store", "PermissionError"),
            skip="root writes to read-only folders" if os.geteuid() == 0 else None),
    CliCase("device-cuda-without-a-gpu", lambda tmp: _extract_args(tmp, "--no-pretrained", "--device", "cuda"),
            ("'cuda'", "CUDA GPU", "--device cpu"), skip="a GPU is present" if torch.cuda.is_available() else None),
    CliCase("device-tpu", lambda tmp: _extract_args(tmp, "--no-pretrained", "--device", "tpu"),
            ("unknown device 'tpu'", "--device")),
    CliCase("garbage-safetensors-weights", _cli_garbage_safetensors, ("w.safetensors", "safetensors", "--weights")),
    CliCase("hf-pickle-refused", _cli_hf_pickle, ("pickle", "argparse.Namespace", "safetensors")),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_cli_one_error_line(case: CliCase, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from neuropredictor.cli import app

    if case.skip:
        pytest.skip(case.skip)
    result = CliRunner().invoke(app, case.build(tmp_path))
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output and result.exception is None or isinstance(result.exception, SystemExit)
    assert output.count("error:") == 1, output
    flat = " ".join(output.split())  # the console wraps long lines
    for word in case.words:
        assert word in flat, flat
    assert not (tmp_path / "out.zarr").exists()


# --------------------------------------------------------------------------------------------------
# failures at finalize, and storage outages


@pytest.mark.parametrize("workers", [0, 1])
def test_a_machine_failure_while_preprocessing_is_retried_not_taken_for_a_bad_image(workers: int, tmp_path: Path,
                                                                                    monkeypatch) -> None:
    # review: any error of a transform made the sample invalid, so host (or GPU) memory full for a moment left a
    # good image as a NaN row of a committed shard, never tried again
    flag = tmp_path / "oom-happened"
    monkeypatch.setenv("NP_TEST_OOM_FLAG", str(flag))
    config = _config(tmp_path, _small_corpus(tmp_path), num_workers=workers,
                     model=CUSTOM.replace(":cifar_cnn", ":out_of_memory_once_cnn"))
    with pytest.raises(NeuroPredictorError, match=r"out of memory reading shard .*x-000000.tar: sample a: MemoryError"):
        pipeline_run(config)  # no retries: the shard fails, saying why
    assert flag.exists()
    manifest = pipeline_run(config)  # the same command: the shard again, whole
    assert manifest["status"] == "complete" and not manifest.get("bad_samples")
    features = open_features(config.out)
    assert bool(features["valid"].all()) and np.isfinite(features["features.5"].values).all()


def test_os_error_at_finalize_is_one_clear_error_and_a_rerun_finishes(tmp_path: Path) -> None:
    config = _config(tmp_path, _small_corpus(tmp_path))
    manifest = tmp_path / "out.zarr" / "manifest.json"

    def block_manifest(event: str, data: dict) -> None:
        if event == "shard":  # every shard is committed: finalize cannot replace a folder with a file
            manifest.unlink(missing_ok=True)
            (manifest / "in-the-way").mkdir(parents=True)

    with pytest.raises(NeuroPredictorError) as info:
        pipeline_run(config, on_event=block_manifest)
    message = str(info.value)
    assert "cannot finalize the output store" in message and "IsADirectoryError" in message
    assert "run the same command again" in message
    (manifest / "in-the-way").rmdir()
    manifest.rmdir()
    assert pipeline_run(config)["status"] == "complete"


def test_s3_outage_fails_the_remaining_shards_and_finalize_cleanly(tmp_path: Path, monkeypatch) -> None:
    """The store's S3 goes away after the first commit, for longer than the retries: the next shard fails after
    its retries, the store is found unreachable then, so the last is not started (it would spend its retries
    alike), finalize fails after its retries, and one error says all that."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing-secret",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem(skip_instance_cache=True, **opts).mkdir("bucket")
    for i in range(3):
        write_tar(tmp_path / "c" / f"x-00000{i}.tar", [(f"k{i}.png", _png(i))])
    config = _config(tmp_path, tmp_path / "c", retries=1, storage_options=opts)
    config = config.model_copy(update={"out": "s3://bucket/out.zarr"})
    stopped = []

    def outage(event: str, data: dict) -> None:
        if event == "shard" and not stopped:
            server.stop()
            stopped.append(data["name"])

    try:
        start = time.monotonic()
        with pytest.raises(NeuroPredictorError) as info:
            pipeline_run(config, on_event=outage)
        assert time.monotonic() - start < 300
    finally:
        if not stopped:
            server.stop()
    message = str(info.value)
    assert "cannot finalize the output store" in message
    tried = sorted({"x-000000", "x-000001", "x-000002"} - set(stopped))[0]
    assert f"1 shard(s) failed after their retries: {tried}; 1 more were not started, since cannot reach the " \
           "output store s3://bucket/out.zarr: EndpointConnectionError" in message
    assert "failed.json" not in message.split("\n", 1)[1] and ".." not in message


# --------------------------------------------------------------------------------------------------
# Prefect's temporary server (`--prefect` without PREFECT_API_URL): it dies with us, and logs no errors


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of the processes whose parent is pid (from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")  # a zombie is gone


def _prefect_cli(tmp: Path) -> tuple[list[str], dict[str, str]]:
    args = [sys.executable, "-m", "neuropredictor", *_extract_args(tmp, "--no-pretrained", "--prefect")]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", *QUIET)}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    return args, env


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")
@pytest.mark.parametrize("sig,starting", [(signal.SIGTERM, False), (signal.SIGKILL, False), (signal.SIGKILL, True)],
                         ids=["SIGTERM", "SIGKILL", "SIGKILL-while-it-starts"])
def test_killed_cli_leaves_no_temporary_prefect_server(sig: signal.Signals, starting: bool, tmp_path: Path) -> None:
    # starting: killed as soon as the server process exists (its watcher used to start only once the server
    # answered, seconds later: a kill then left it running)
    args, env = _prefect_cli(tmp_path)
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        server = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            kids = _children(proc.pid)
            servers = [pid for pid, cmd in kids.items() if "uvicorn" in cmd]
            if servers and (starting or any("-c" in cmd.split()[:3] for cmd in kids.values())):  # and its watcher
                server = servers[0]
                break
            time.sleep(0.05 if starting else 0.2)
        assert server is not None, "the temporary server did not start: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(sig)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server), f"Prefect's temporary server (pid {server}) outlived the CLI ({sig.name})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_offline_prefect_run_logs_no_error(tmp_path: Path) -> None:
    args, env = _prefect_cli(tmp_path)
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=500, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if "ERROR" in line] == [], proc.stderr[-3000:]
