"""The shard-level data path end to end: shards -> extract_shard -> Zarr, against an independent
in-memory computation; concurrency, a killed process, corrupt images, config mismatch, S3, the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import MODEL, check_against_reference, make_images
from neuropredictor.corpus import list_shards, make_shards
from neuropredictor.errors import (ConfigMismatchError, CorpusError, LayerNotFoundError, ModelSpecError,
                                   NeuroPredictorError, StoreError)
from neuropredictor import ExtractConfig, extract_shard, finalize, plan, run
from neuropredictor.models import load_model
from neuropredictor.store import FeatureStore, open_features

def _config(corpus, out, **kw) -> ExtractConfig:
    base = dict(corpus=corpus if isinstance(corpus, list) else str(corpus), model=MODEL, layers=["layer2", "layer4"], reduce="layer2=pool:2,layer4=avgpool",
                out=str(out), pretrained=False, batch_size=4, num_workers=1)
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture
def corpus(tmp_path, image_dir):
    make_shards(image_dir, str(tmp_path / "shards"), maxcount=10)  # 25 images -> 10, 10, 5
    return tmp_path / "shards"


def _check_against_reference(url, image_dir, storage_options=None):
    return check_against_reference(open_features(url, storage_options), image_dir)


def test_store_equals_independent_forward_local(corpus, image_dir, tmp_path):
    out = tmp_path / "out.zarr"
    manifest = run(_config(corpus, out))
    assert manifest["status"] == "complete" and manifest["rows"]["valid"] == 25
    assert [s["status"] for s in manifest["shards"]] == ["committed"] * 3
    assert manifest["config"]["model"] == MODEL and manifest["config"]["weights"] == "random:seed0"
    ds = _check_against_reference(str(out), image_dir)
    assert ds["layer2"].dims == ("stimulus", "layer2.dim_1", "layer2.dim_2", "layer2.dim_3")
    # plain zarr and xarray read it with named dims
    import xarray as xr

    assert xr.open_zarr(out, group="features")["layer4"].dims[0] == "stimulus"
    assert zarr.open_group(str(out), mode="r")["features/layer4"].shape == (25, 512)


def test_layers_read_back_in_the_models_order(corpus, tmp_path):
    """Zarr lists a group's arrays alphabetically (avgpool, fc, layer1); the model runs layer1, avgpool, fc:
    the Dataset, and encode's layer order, follow the model."""
    from neuropredictor.encode.align import open_dataset

    out = str(tmp_path / "out.zarr")
    run(_config(corpus, out, layers=["fc", "layer1", "avgpool"], reduce="layer1=avgpool"))
    expected = ["layer1", "avgpool", "fc"]
    assert [str(v) for v in open_features(out).data_vars] == [*expected, "valid"]
    assert open_dataset(out, None)[1] == open_dataset(open_features(out), None)[1] == expected


def test_store_equals_independent_forward_s3(s3, image_dir, tmp_path):
    make_shards(image_dir, "s3://test-bucket/corpus", maxcount=10, storage_options=s3)
    cfg = _config("s3://test-bucket/corpus", "s3://test-bucket/runs/r1.zarr", storage_options=s3)
    manifest = run(cfg)
    assert manifest["status"] == "complete"
    _check_against_reference("s3://test-bucket/runs/r1.zarr", image_dir, s3)
    text = json.dumps(manifest)
    assert "testing-secret" not in text  # storage options never reach the manifest


def test_unequal_shards_concurrent_equals_sequential(tmp_path):
    images = tmp_path / "imgs"
    make_images(images, 25, nested=False)
    files = sorted(images.iterdir())
    shard_dir = tmp_path / "shards"
    # shards of 7, 13 and 5 samples: three corpora made separately, listed as one
    for name, part in (("a", files[:7]), ("b", files[7:20]), ("c", files[20:])):
        sub = tmp_path / f"src_{name}"
        sub.mkdir()
        for f in part:
            (sub / f.name).write_bytes(f.read_bytes())
        make_shards(sub, str(shard_dir / name), maxcount=100, prefix=f"part{name}")
    corpus = [str(shard_dir / n) for n in "abc"]
    assert [s.count for s in list_shards(corpus)] == [7, 13, 5]

    seq = _config(corpus, tmp_path / "seq.zarr")
    run(seq)
    par = _config(corpus, tmp_path / "par.zarr")
    store = plan(par)
    errors = []

    def work(shard):
        try:
            extract_shard(par, shard)
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in store.shards]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    finalize(par)
    a, b = open_features(str(tmp_path / "seq.zarr")), open_features(str(tmp_path / "par.zarr"))
    assert list(a["key"].values) == list(b["key"].values)
    for layer in ("layer2", "layer4"):
        np.testing.assert_array_equal(a[layer].values, b[layer].values)
    assert not np.isnan(b["layer4"].values).any()


_KILL_SCRIPT = """
import os, signal, sys
from neuropredictor import ExtractConfig, extract_shard
from neuropredictor.store import FeatureStore
cfg = ExtractConfig.model_validate_json(sys.argv[1])
store = FeatureStore.open(cfg.out)
shard = store.shards[int(sys.argv[2])]
seen = [0]
def on_batch(n):
    seen[0] += 1
    if seen[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # die mid-shard, after some rows were handed to the writer
extract_shard(cfg, shard, store=store, on_batch=on_batch)
"""


def test_killed_mid_shard_leaves_no_commit_and_rerun_completes(corpus, image_dir, tmp_path):
    cfg = _config(corpus, tmp_path / "out.zarr")
    store = plan(cfg)
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, cfg.model_dump_json(), "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not store.is_committed(store.shards[1].name)
    manifest = run(cfg)  # resumes: does everything still missing
    assert manifest["status"] == "complete"
    _check_against_reference(str(tmp_path / "out.zarr"), image_dir)


def test_committed_shard_is_a_noop(corpus, tmp_path):
    cfg = _config(corpus, tmp_path / "out.zarr")
    run(cfg)
    store = FeatureStore.open(cfg.out)
    before = {p: p.stat().st_mtime_ns for p in Path(cfg.out).rglob("*") if p.is_file() and "features" in p.parts}
    record = extract_shard(cfg, store.shards[0], store=store)
    assert record.get("skipped") is True
    after = {p: p.stat().st_mtime_ns for p in Path(cfg.out).rglob("*") if p.is_file() and "features" in p.parts}
    assert before == after


def test_a_shard_read_short_is_never_committed(corpus, tmp_path, monkeypatch):
    # review: the writer pads rows never written with fill, so a reader yielding fewer rows than the plan's count
    # would have committed padded rows, missing from bad_samples; the readers check counts, this guards the commit
    from neuropredictor.pipeline import extraction

    real = extraction.read_shard

    def short(*args, **kwargs):
        yield from list(real(*args, **kwargs))[:-1]

    monkeypatch.setattr(extraction, "read_shard", short)
    cfg = _config(corpus, tmp_path / "out.zarr", num_workers=0)
    store = plan(cfg)
    with pytest.raises(CorpusError, match=r"shard-000000: 8 of its 10 rows were read; it is not committed"):
        extract_shard(cfg, store.shards[0], store=store)
    assert store.commit_record(store.shards[0].name) is None


def test_corrupt_image_is_recorded_and_skipped(tmp_path):
    images = tmp_path / "imgs"
    make_images(images, 9, nested=False)
    bad = images / "img0003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    make_shards(images, str(tmp_path / "shards"), maxcount=5)
    cfg = _config(tmp_path / "shards", tmp_path / "out.zarr")
    manifest = run(cfg)
    assert manifest["status"] == "complete"
    assert manifest["rows"] == {"total": 9, "committed": 9, "valid": 8, "invalid": 1}
    assert [b["key"] for b in manifest["bad_samples"]] == ["img0003"]
    assert "decode" in manifest["bad_samples"][0]["reason"] or "image" in manifest["bad_samples"][0]["reason"]
    ds = open_features(cfg.out)
    row = list(ds["key"].values).index("img0003")
    assert not bool(ds["valid"][row]) and np.isnan(ds["layer4"].values[row]).all()
    assert np.isfinite(np.delete(ds["layer4"].values, row, axis=0)).all()


def test_config_mismatch_is_refused_and_overwrite_replaces(corpus, tmp_path):
    out = tmp_path / "out.zarr"
    run(_config(corpus, out))
    manifest_before = (out / "manifest.json").read_text()
    with pytest.raises(ConfigMismatchError) as info:
        plan(_config(corpus, out, reduce="avgpool"))
    assert "reductions" in str(info.value) and "overwrite=True" in str(info.value)
    assert (out / "manifest.json").read_text() == manifest_before  # nothing written
    # batch size and workers are not part of the identity: a resume with other values is fine
    plan(_config(corpus, out, batch_size=3, num_workers=0))
    manifest = run(_config(corpus, out, reduce="avgpool", overwrite=True))
    assert manifest["layers"][0]["reduction"] == "avgpool" and manifest["layers"][0]["shape"] == [128]


def test_bad_inputs_fail_before_anything_is_written(corpus, tmp_path):
    out = tmp_path / "never.zarr"
    with pytest.raises(ModelSpecError):
        plan(_config(corpus, out, model="torchvision:resnet19"))
    with pytest.raises(LayerNotFoundError, match="layer4"):
        plan(_config(corpus, out, layers=["layer5"]))
    with pytest.raises(CorpusError):
        plan(_config(tmp_path / "no-such-dir", out))
    assert not out.exists()


def test_compiled_run_equals_eager_run(tmp_path):
    """compile=True through the whole path (padded last batches included: 12 images, batch 5)."""
    images = tmp_path / "imgs"
    make_images(images, 12, nested=False)
    make_shards(images, str(tmp_path / "shards"), maxcount=6)
    spec = f"custom:{Path(__file__).parent / 'custom_models.py'}:cifar_cnn"
    kw = dict(model=spec, layers=["features.5", "classifier.2"], reduce="full", batch_size=5)
    eager = run(_config(tmp_path / "shards", tmp_path / "eager.zarr", **kw))
    compiled = run(_config(tmp_path / "shards", tmp_path / "compiled.zarr", compile=True, **kw))
    assert eager["config_hash"] == compiled["config_hash"]  # compile does not change the identity
    a, b = open_features(str(tmp_path / "eager.zarr")), open_features(str(tmp_path / "compiled.zarr"))
    for layer in kw["layers"]:
        assert a[layer].shape[0] == 12
        np.testing.assert_allclose(b[layer].values, a[layer].values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("verify", [False, True])
def test_a_resume_reads_the_commit_records_once_before_finalize(corpus, tmp_path, monkeypatch, verify):
    # At 10,000 shards on S3 each read of the records is 10,000 GETs: plan reads them, and verify, the progress
    # event and the queue of shards use what it read (before: three reads, four with verify, then finalize's).
    from neuropredictor.store.records import Records

    out = tmp_path / "out.zarr"
    run(_config(corpus, out))
    reads = []
    original = Records.by_kind
    monkeypatch.setattr(Records, "by_kind", lambda self: reads.append(1) or original(self))
    events = []
    manifest = run(_config(corpus, out, verify=verify), on_event=lambda event, data: events.append((event, data)))
    assert manifest["status"] == "complete" and len(reads) == 2  # plan, finalize
    planned = next(data for event, data in events if event == "planned")
    assert planned["committed_shards"] == 3 and not any(event == "shard" for event, _ in events)


def test_a_resume_reads_the_corpus_named_now_not_the_plans_urls(corpus, tmp_path):
    # The plan records where the corpus was (URLs redacted, maybe since moved); a resume must read the corpus
    # the user names now. Before, it read the plan's URLs: here, the other images' features, marked complete.
    out = tmp_path / "out.zarr"
    plan(_config(corpus, out))  # planned, then stopped before a shard committed
    other_images = tmp_path / "other_images"
    make_images(other_images, 25, seed=7)  # same names and counts, other pixels
    make_shards(other_images, str(tmp_path / "moved"), maxcount=10)
    manifest = run(_config(tmp_path / "moved", out))
    assert manifest["status"] == "complete"
    _check_against_reference(str(out), other_images)
    assert all(Path(s["url"]).parent == tmp_path / "moved" for s in manifest["shards"])  # where rows came from


def test_layers_named_like_credentials_keep_their_checksums_and_reductions(corpus, tmp_path):
    # `key` (attention's key projection) and `token_mixer` are layer names, not credentials: redacting their
    # checksums made every verify=True run take the shards back, and their reductions read '***'.
    spec = f"custom:{Path(__file__).parent / 'custom_models.py'}:named_like_credentials"
    config = _config(corpus, tmp_path / "out.zarr", model=spec, layers=["key", "token_mixer"],
                     reduce="key=flatten,token_mixer=avgpool")
    manifest = run(config)
    assert manifest["config"]["reductions"] == {"key": "flatten", "token_mixer": "avgpool"}
    assert FeatureStore.open(config.out).verify() == {}
    events = []
    run(config.model_copy(update={"verify": True}), on_event=lambda event, data: events.append(event))
    assert "shard" not in events  # nothing taken back, nothing extracted again


def test_the_library_path_reads_the_corpus_named_now(corpus, tmp_path):
    # plan -> extract_shard for each of store.shards -> finalize, as the README shows it, on a resume after the
    # corpus moved: the planned store's shards are where the corpus is now.
    out = tmp_path / "out.zarr"
    plan(_config(corpus, out))
    moved = tmp_path / "moved"
    corpus.rename(moved)
    store = plan(_config(moved, out))
    assert all(Path(s.url).parent == moved for s in store.shards)
    for shard in store.shards:
        extract_shard(_config(moved, out), shard, store=store)
    assert finalize(_config(moved, out))["status"] == "complete"


def test_a_checkpoint_replaced_at_the_same_path_is_loaded_again(corpus, tmp_path):
    # The process keeps a replica per device, keyed by the options: the same `weights` path with another
    # file behind it reused the old replica (old numbers, old checksum in the new store).
    import torch

    path = tmp_path / "ckpt.pt"
    manifests = []
    state = load_model(MODEL, pretrained=False).module.state_dict()
    for seed in (1, 2):
        torch.save({k: v * (1 + 0.5 * seed) if v.is_floating_point() else v for k, v in state.items()}, path)
        manifests.append(run(_config(corpus, tmp_path / f"out{seed}.zarr", weights=str(path))))
    assert manifests[0]["config"]["weights"] != manifests[1]["config"]["weights"]
    a, b = (open_features(str(tmp_path / f"out{seed}.zarr"))["layer4"].values for seed in (1, 2))
    assert not np.allclose(a, b)


def test_a_custom_factory_that_loads_its_own_checkpoint_is_named_by_its_weights(corpus, tmp_path):
    # its weights were named "factory" whatever it loaded: a retrained checkpoint behind the same factory
    # resumed the old one's store, mixing two models' rows under one name
    import torch

    (tmp_path / "lab.py").write_text(
        "from pathlib import Path\nimport torch, torchvision\n\n"
        "def net():\n    m = torchvision.models.resnet18()\n"
        "    m.load_state_dict(torch.load(Path(__file__).with_name('ckpt.pt'), weights_only=True))\n"
        "    return m\n")
    spec, out = f"custom:{tmp_path / 'lab.py'}:net", tmp_path / "out.zarr"
    state = load_model("torchvision:resnet18", pretrained=False).module.state_dict()
    torch.save(state, tmp_path / "ckpt.pt")
    first = run(_config(corpus, out, model=spec, pretrained=True))
    assert first["config"]["weights"].startswith("state-sha256:")
    assert load_model(spec).weights == first["config"]["weights"]  # the same weights, the same name
    torch.save({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "ckpt.pt")
    with pytest.raises(ConfigMismatchError, match="weights"):  # in this process too: the replica is not reused
        plan(_config(corpus, out, model=spec, pretrained=True))


def test_a_custom_models_code_is_part_of_its_store(corpus, tmp_path):
    # a forward pass fixed in the model file (same weights): the rerun resumed the store, and its new rows
    # joined the old code's under one name
    source = tmp_path / "lab_net.py"
    body = ("import torch, torchvision\n\nclass Net(torchvision.models.ResNet):\n"
            "    def forward(self, x):\n        return super().forward(x{})\n\n"
            "def net():\n    return Net(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])\n")
    source.write_text(body.format(""))
    spec, out = f"custom:{source}:net", tmp_path / "out.zarr"
    first = run(_config(corpus, out, model=spec))
    assert first["config"]["code"].startswith("sha256:")
    source.write_text(body.format(" * 2"))
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    with pytest.raises(ConfigMismatchError, match="config.code: stored=\"sha256:"):
        plan(_config(corpus, out, model=spec))
    # a store planned before the code was recorded resumes as it is
    plan_file = out / "_plan.json"
    stored = json.loads(plan_file.read_text())
    del stored["config"]["code"]
    plan_file.write_text(json.dumps(stored))
    (out / "manifest.json").unlink()
    assert plan(_config(corpus, out, model=spec)).config.get("code") is None


def test_a_custom_models_code_is_the_file_defining_its_factory_as_it_ran(tmp_path, monkeypatch):
    # `custom:pkg:net` re-exported from pkg/nets.py: the package's __init__ was hashed, not the forward pass;
    # and a module imported by name, edited since, was hashed as the new file while its old code ran
    import hashlib

    package = tmp_path / "np_pkg_code"
    package.mkdir()
    (package / "__init__.py").write_text("from .nets import net\n")
    nets = package / "nets.py"
    nets.write_text("import torchvision\n\ndef net():\n    return torchvision.models.resnet18()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("custom:np_pkg_code:net", pretrained=False)
    assert loaded.code == "sha256:" + hashlib.sha256(nets.read_bytes()).hexdigest()
    nets.write_text(nets.read_text() + "# the forward pass, fixed\n")
    os.utime(nets, ns=(nets.stat().st_atime_ns, nets.stat().st_mtime_ns + 10**9))
    with pytest.raises(ModelSpecError, match="nets.py was edited after this process imported it"):
        load_model("custom:np_pkg_code:net", pretrained=False)
    for name in ("np_pkg_code", "np_pkg_code.nets"):
        monkeypatch.delitem(sys.modules, name)


def test_a_model_file_changed_during_a_run_adds_no_rows(corpus, tmp_path):
    # a checkpoint saved again mid-run: the workers reloaded it at their next shard (its file's stamp is
    # part of the replica's key), and the store held two models' rows under the first one's name
    import torch

    weights = tmp_path / "ckpt.pt"
    state = load_model(MODEL, pretrained=False).module.state_dict()
    torch.save(state, weights)
    config = _config(corpus, tmp_path / "out.zarr", weights=str(weights), retries=0)

    def on_event(event, data):
        if event == "shard" and not weights.with_suffix(".done").exists():  # after the first shard: epoch 2
            torch.save({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}, weights)
            os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
            weights.with_suffix(".done").touch()

    with pytest.raises(NeuroPredictorError, match="(?s)shard.*failed.*differs from the one the store"):
        run(config, on_event=on_event)
    store = FeatureStore.open(config.out)
    assert len(store.committed()) == 1 and "weights" in store.records.by_kind()[1][store.shards[1].name]["error"]
    torch.save(state, weights)  # the original put back: the run completes with the first model's rows
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 2 * 10**9))
    assert run(config)["status"] == "complete"


def test_a_notebook_rerun_after_the_model_changed_uses_the_new_model(corpus, tmp_path, monkeypatch):
    """run() in one process keeps a replica for the next run: a factory redefined in a notebook (same spec,
    random weights), an edited model file, and an `hf:` folder saved again each gave the old model's rows,
    recorded under the old name."""
    import sys
    import types

    import torch

    def layer4(out):
        return open_features(str(out))["layer4"].values

    notebook = types.ModuleType("np_notebook")  # stands for __main__: cells define the factory
    monkeypatch.setitem(sys.modules, "np_notebook", notebook)
    notebook.net = lambda pretrained=False: __import__("torchvision").models.resnet18()
    first = run(_config(corpus, tmp_path / "a.zarr", model="custom:np_notebook:net"))

    def wider(pretrained=False):  # the cell edited: same layers, other weights
        m = __import__("torchvision").models.resnet18()
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(2.0)
        return m

    notebook.net = wider
    second = run(_config(corpus, tmp_path / "b.zarr", model="custom:np_notebook:net"))
    assert first["config"]["weights"] != second["config"]["weights"]
    assert not np.allclose(layer4(tmp_path / "a.zarr"), layer4(tmp_path / "b.zarr"))
    with pytest.raises(ConfigMismatchError, match="weights"):  # nor does the first store resume with it
        plan(_config(corpus, tmp_path / "a.zarr", model="custom:np_notebook:net"))

    # a folder in the working directory named like a hub model is not that model's (not part of its key)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18").mkdir()
    key = _config(corpus, tmp_path / "x.zarr", model="timm:resnet18").replica_key()
    (tmp_path / "resnet18" / "chunk").write_text("x")
    assert _config(corpus, tmp_path / "x.zarr", model="timm:resnet18").replica_key() == key

    # an edited .py file: executed again
    source = tmp_path / "model_file.py"
    source.write_text("import torchvision\n\ndef net():\n    return torchvision.models.resnet18()\n")
    spec = f"custom:{source}:net"
    assert type(load_model(spec).module).__name__ == "ResNet"
    source.write_text("import torchvision\n\ndef net():\n    return torchvision.models.resnet34()\n")
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert len(load_model(spec).module.layer1) == 3  # resnet34's, not the module imported before

    # an hf: folder saved again
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "vit"
    config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=32, patch_size=16)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        transformers.ViTModel(config).save_pretrained(folder)  # "the next epoch", into the same folder
        out = tmp_path / f"vit{seed}.zarr"
        outs.append(run(_config(corpus, out, model=f"hf:{folder}", layers=["layers.1"], reduce="cls",
                                pretrained=True)))
    assert outs[0]["config"]["weights"] != outs[1]["config"]["weights"]
    a, b = (open_features(str(tmp_path / f"vit{seed}.zarr"))["layers.1"].values for seed in (1, 2))
    assert not np.allclose(a, b)


def test_read_image_gives_a_notebook_the_rows_of_the_store(tmp_path):
    """A notebook's own batch, made with read_image + model.transform, equals the store's rows also for the
    images a plain `Image.open(p).convert("RGB")` gets wrong: 16-bit, transparent, EXIF-rotated."""
    from PIL import Image

    from neuropredictor import Extractor, read_image

    rng = np.random.default_rng(3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 65535, (40, 48), dtype=np.uint16)).save(folder / "deep.png")
    rgba = rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(48) < 24, 0, 255)  # half transparent
    Image.fromarray(rgba, "RGBA").save(folder / "clear.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(folder / "turned.jpg", exif=exif)
    make_shards(folder, str(tmp_path / "shards"))
    out = tmp_path / "out.zarr"
    run(_config(tmp_path / "shards", out, layers=["layer4"], reduce="avgpool"))
    stored = open_features(str(out))
    model = load_model(MODEL, pretrained=False)
    with Extractor(model, ["layer4"], reduce="avgpool") as ex:
        for key in ("deep", "clear", "turned"):
            path = next(folder.glob(key + ".*"))
            row = stored["layer4"].values[list(stored.key.values).index(key)]
            mine = ex(model.transform(read_image(path))[None])["layer4"][0].numpy()
            np.testing.assert_allclose(mine, row, rtol=1e-5, atol=1e-6, err_msg=key)
            naive = ex(model.transform(Image.open(path).convert("RGB"))[None])["layer4"][0].numpy()
            assert not np.allclose(naive, row, atol=1e-3), key  # what the README's recipe used to give
    assert read_image(path.read_bytes()).size == (40, 64)  # bytes too; turned upright


def test_a_joining_run_leaves_a_commit_made_before_it_took_the_claim(corpus, tmp_path, monkeypatch):
    # run B saw the shard uncommitted; run A, holding the shard's claim, committed it and let the claim go; B
    # then took the claim, and its writer withdrew A's commit: committed work lost (the other run ended partial)
    config = _config(corpus, tmp_path / "out.zarr")
    store = plan(config)
    shard = store.shards[0]
    joining = FeatureStore.open(config.out)
    real_claim = joining.claim
    committed = {}

    def claim_late(s):  # between B's look at the commit record and its claim, A extracts the shard
        committed.update(extract_shard(config, s, store=FeatureStore.open(config.out)))
        return real_claim(s)

    monkeypatch.setattr(joining, "claim", claim_late)
    joined = extract_shard(config, shard, store=joining)
    assert joined.get("skipped") and committed["committed_at"] == joined["committed_at"]
    assert FeatureStore.open(config.out).commit_record(shard.name)["committed_at"] == committed["committed_at"]


@pytest.mark.parametrize("killed_after", [1, 2, 3, 5])
def test_an_overwrite_killed_while_deleting_leaves_a_store_that_runs_again(corpus, tmp_path, monkeypatch,
                                                                          killed_after):
    # killed after deleting _generation.json and the root zarr.json, the old store read as complete, could
    # not be opened, and every later run of its own config failed in finalize: stuck for good
    import neuropredictor.store.feature_store as feature_store
    from neuropredictor.fs import remove_tree

    out = tmp_path / "out.zarr"
    config = _config(corpus, out)
    run(config)
    reference = open_features(str(out))["layer4"].values
    calls = []

    def killed(fs, path):
        if len(calls) == killed_after:
            raise KeyboardInterrupt
        calls.append(path)
        remove_tree(fs, path)

    monkeypatch.setattr(feature_store.fsx, "remove_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        plan(_config(corpus, out, layers=["layer4"], reduce="avgpool", overwrite=True))
    monkeypatch.undo()
    status = FeatureStore.open(str(out), mode="r").current_status()
    assert str(status) != "complete", (calls, status)  # never "complete" while half deleted
    manifest = run(config)  # the original command again: planned again, extracted, readable
    assert manifest["status"] == "complete"
    np.testing.assert_array_equal(open_features(str(out))["layer4"].values, reference)


def test_retry_delays_are_drawn_apart_for_each_run():
    # Prefect 3.8's task engine leaves retry_jitter_factor unused: without jitter drawn here, every pod
    # of a cluster retried in step after a storage outage
    from neuropredictor.schedule import RetryPolicy

    policy = RetryPolicy(retries=3, delay_s=10.0, jitter=0.5)
    draws = [policy.delays() for _ in range(5)]
    for delays in draws:
        assert all(10.0 * 2**i <= d <= 15.0 * 2**i for i, d in enumerate(delays)) and len(delays) == 3
    assert len({tuple(d) for d in draws}) == 5


def test_a_float16_store_refuses_features_beyond_its_range(corpus, tmp_path):
    # the features reached the writer already cast to float16 (inf), so its range check never fired:
    # valid rows held inf and the run ended complete
    factory = tmp_path / "loud.py"
    factory.write_text(
        "import torch\nfrom torch import nn\nfrom torchvision.transforms import v2\n"
        "class Loud(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.scale = nn.Identity()\n"
        "    def forward(self, x):\n        return self.scale(x.mean((2, 3)) * 0 + 1e5)\n"
        "def loud():\n"
        "    return Loud(), v2.Compose([v2.Resize((8, 8)), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])\n")
    cfg = _config(corpus, tmp_path / "out.zarr", model=f"custom:{factory}:loud", layers=["scale"], reduce="",
                  dtype="float16")
    store = plan(cfg)
    with pytest.raises(StoreError, match=r"layer 'scale': 12 feature value\(s\) up to 1e\+05 do not fit float16"):
        extract_shard(cfg, store.shards[0], store)
    assert not store.is_committed(store.shards[0].name)


def test_a_model_failing_on_every_shard_stops_after_the_first_groups(tmp_path, image_dir):
    # a model that runs out of memory on every batch spent every shard's retries, one shard after another:
    # hours per broken model in a sweep before the next one ran
    from neuropredictor.schedule import GIVE_UP_AFTER
    from neuropredictor.schedule import run as run_here

    make_shards(image_dir, str(tmp_path / "shards"), maxcount=4)  # 25 images: 7 shards
    factory = tmp_path / "oom.py"
    factory.write_text(
        "import torch\nfrom torch import nn\nfrom torchvision.transforms import v2\n"
        "class Oom(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.head = nn.Identity()\n"
        "    def forward(self, x):\n"
        "        if x.shape[0] > 2:  # the layers' probe (2 images) passes, a real batch (4) does not\n"
        "            raise torch.OutOfMemoryError('CUDA out of memory (simulated)')\n"
        "        return self.head(x.mean((2, 3)))\n"
        "def oom():\n"
        "    return Oom(), v2.Compose([v2.Resize((8, 8)), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])\n")
    cfg = _config(tmp_path / "shards", tmp_path / "out.zarr", model=f"custom:{factory}:oom", layers=["head"],
                  reduce="full", retries=1, retry_delay_seconds=0.0, device="cpu")
    with pytest.raises(NeuroPredictorError) as info:
        run_here(cfg)
    message = str(info.value)
    assert message.startswith("3 shard(s) failed after their retries: shard-000000, shard-000001, shard-000002; "
                              "4 more were not started, since the first groups all failed.")
    assert message.count("OutOfMemoryError") == GIVE_UP_AFTER and "are stored and committed" not in message
    shards = json.loads((tmp_path / "out.zarr" / "manifest.json").read_text())["shards"]
    assert [s["status"] for s in shards] == ["failed"] * GIVE_UP_AFTER + ["pending"] * (7 - GIVE_UP_AFTER)
    assert [s["attempts"] for s in shards[:GIVE_UP_AFTER]] == [2] * GIVE_UP_AFTER  # each with its retry
    # the next run starts with the shards not tried yet: three bad shards at the front would end every rerun
    from neuropredictor.schedule import pending_groups

    store = FeatureStore.open(cfg.out)
    order = [g[0].name for g in pending_groups(store, store.shards)]
    assert order == [f"shard-00000{i}" for i in (3, 4, 5, 6, 0, 1, 2)]


def test_giving_up_waits_for_groups_in_flight_and_counts_a_partly_committed_group_as_working():
    from neuropredictor.schedule import DeviceWindow
    from neuropredictor.shard import Shard

    shards = [Shard(f"x/s{i}.tar", f"s{i}", 1, i) for i in range(8)]
    never = lambda name: False  # noqa: E731
    # two devices: three fast failures on one while the other's first group still runs (and then succeeds)
    window = DeviceWindow([[s] for s in shards], ["cuda:0", "cuda:1"])
    (g0, d0), (g1, d1) = window.start()
    window.finish(g0, d0, "OutOfMemoryError: cuda:0", never)
    for _ in range(2):
        ((g, d),) = window.start()
        window.finish(g, d, "OutOfMemoryError: cuda:0", never)
    assert window.start() == []  # not given up: cuda:1's group may still succeed
    window.finish(g1, d1, None, never)
    assert len(window.start()) == 2 and not any(v.startswith("not started") for v in window.failed.values())
    # groups of two shards: one committed before the other failed is no sign of a broken model
    window = DeviceWindow([shards[i:i + 2] for i in range(0, 8, 2)], ["cpu"])
    for _ in range(3):
        ((g, d),) = window.start()
        window.finish(g, d, "CorpusError: truncated", lambda name: name in ("s0", "s2", "s4"))
    assert len(window.start()) == 1 and sorted(window.failed) == ["s1", "s3", "s5"]


def test_a_storage_outage_mid_run_stops_starting_shards_after_the_first_group_it_fails(image_dir, tmp_path):
    """Review: storage lost after some shards committed cost every remaining shard its full retries (a minute or more
    each: a day over 1,000 shards). A group that fails whole while its storage cannot be reached ends the run's
    starts; and a shard's error is not replaced by the error of recording it (that record goes to the same
    storage)."""
    from moto.server import ThreadedMotoServer

    from conftest import _free_port

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s",
            "config_kwargs": {"connect_timeout": 1, "read_timeout": 2}}
    try:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, **opts).mkdir("lab")
        make_shards(image_dir, "s3://lab/corpus", maxcount=3, storage_options=opts)  # 25 images: 9 shards
        cfg = _config("s3://lab/corpus", "s3://lab/out.zarr", storage_options=opts, retries=1,
                      retry_delay_seconds=0.0, num_workers=0)
        events = []

        def on_event(event, data):
            events.append(event)
            if event == "shard" and events.count("shard") == 2:
                server.stop()  # the storage goes (moto keeps nothing: it does not come back)

        t0 = time.monotonic()
        with pytest.raises(NeuroPredictorError) as info:
            run(cfg, on_event=on_event)
    finally:
        server.stop()
    message = str(info.value)
    assert re.search(r"more were not started, since cannot reach the (output store s3://lab/out.zarr|corpus s3://lab/"
                     r"corpus/shard-\d+.tar): EndpointConnectionError", message), message
    tried = int(re.search(r"(\d+) shard\(s\) failed after their retries", message)[1])
    assert tried == 1 and int(re.search(r"; (\d+) more were not started", message)[1]) == 9 - 2 - tried
    assert "its failure could not be recorded" not in message and "failed.json" not in message
    assert time.monotonic() - t0 < 120


def test_a_failure_message_names_the_first_shards_and_counts_the_rest():
    # 10,000 shards failing on expired credentials made a message (and a Prefect state message) of megabytes
    from neuropredictor.schedule import failure_message
    from neuropredictor.status import FAILURES_SHOWN

    failed = {f"shard-{i:06d}": f"PermissionError: expired token {i}" for i in range(FAILURES_SHOWN + 5)}
    message = failure_message(failed)
    assert message.startswith(f"{FAILURES_SHOWN + 5} shard(s) failed after their retries: shard-000000, ")
    assert "shard-000019 and 5 more (each named in the manifest)" in message and "shard-000020" not in message
    assert message.count("PermissionError") == FAILURES_SHOWN and "run the same command again" in message


def test_a_scoped_plan_reads_only_its_shards_commit_records(corpus, tmp_path):
    # each child of extract-distributed planned with every commit record of the store (10,000 per child of
    # 16 shards at 10,000 shards): it reads and checks its own group's only
    out = tmp_path / "out.zarr"
    run(_config(corpus, out))
    store = FeatureStore.open(str(out))
    assert set(store.committed(["shard-000001", "shard-000009"])) == {"shard-000001"}
    assert store.committed(["shard-000002"])["shard-000002"] == store.committed()["shard-000002"]
    (out / "_status" / "shard-000002.json").write_text("{")  # damaged: not committed
    scoped = plan(_config(corpus, out), scope=["shard-000001", "shard-000002"])
    assert scoped.committed_at_plan == {"shard-000001"}
    assert plan(_config(corpus, out)).committed_at_plan == {"shard-000000", "shard-000001"}


# ---------------------------------------------------------------------------------------------
# the next shard's reader, started while the current one ends


def test_the_window_promises_each_device_its_next_group_and_keeps_the_promise():
    from neuropredictor.schedule import DeviceWindow
    from neuropredictor.shard import Shard

    shards = [Shard(f"x/s{i}.tar", f"s{i}", 1, i) for i in range(5)]
    never = lambda name: False  # noqa: E731
    window = DeviceWindow([[s] for s in shards], ["cuda:0", "cuda:1"])
    (g0, d0), (g1, d1) = window.start()
    # each device, ending its group, is told a different next group (one reader started for each)
    assert window.upcoming("cuda:0").name == "s2" and window.upcoming("cuda:1").name == "s3"
    assert window.upcoming("cuda:0").name == "s2"  # asked again: the same
    window.finish(g1, d1, None, never)
    assert [(g[0].name, d) for g, d in window.start()] == [("s3", "cuda:1")]  # its promise, though s2 waits longer
    window.finish(g0, d0, None, never)
    assert [(g[0].name, d) for g, d in window.start()] == [("s2", "cuda:0")]
    assert window.upcoming("cuda:0").name == "s4" and window.upcoming("cuda:1") is None  # one left: promised once
    window.finish([shards[3]], "cuda:1", None, never)
    assert [(g[0].name, d) for g, d in window.start()] == [("s4", "cuda:1")]  # a free device is not kept waiting
    assert window.upcoming("cuda:0") is None


def test_each_shards_reader_starts_before_the_one_before_it_commits(tmp_path, image_dir, monkeypatch):
    """The reader of the next shard (its decode workers, its first batch) starts as the current shard's last batch
    is read, not after its commit: each shard otherwise began with the device waiting. The store is the same,
    and no decode worker is left behind."""
    import multiprocessing

    from neuropredictor.pipeline import readahead as ra
    from neuropredictor.store.writer import ShardWriter

    make_shards(image_dir, str(tmp_path / "shards"), maxcount=5)  # 25 images -> 5 shards
    events: list[tuple[str, str]] = []
    start, commit = ra.Readahead.start, ShardWriter.commit
    monkeypatch.setattr(ra.Readahead, "start", lambda self, device, shard, open_reader: (
        events.append(("read", shard.name)), start(self, device, shard, open_reader))[1])
    monkeypatch.setattr(ShardWriter, "commit", lambda self, record: (
        events.append(("commit", self._shard.name)), commit(self, record))[1])
    manifest = run(_config(tmp_path / "shards", tmp_path / "ahead.zarr", num_workers=2))
    assert manifest["status"] == "complete" and not multiprocessing.active_children()
    names = [f"shard-{i:06d}" for i in range(5)]
    for before, after in zip(names, names[1:]):
        assert events.index(("read", after)) < events.index(("commit", before)), events
    sequential = run(_config(tmp_path / "shards", tmp_path / "plain.zarr", num_workers=0))
    assert sequential["status"] == "complete"
    a, b = open_features(str(tmp_path / "ahead.zarr")), open_features(str(tmp_path / "plain.zarr"))
    assert list(a.key.values) == list(b.key.values)
    for layer in ("layer2", "layer4"):
        np.testing.assert_array_equal(a[layer].values, b[layer].values)


def test_a_next_shard_that_cannot_be_read_fails_on_its_own_and_one_not_taken_is_stopped(tmp_path, image_dir):
    import multiprocessing

    from neuropredictor.errors import NeuroPredictorError

    make_shards(image_dir, str(tmp_path / "shards"), maxcount=10)  # 10, 10, 5
    (tmp_path / "shards" / "shard-000001.offsets.json").unlink()
    tar = tmp_path / "shards" / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # read ahead, raised at its own turn
    with pytest.raises(NeuroPredictorError, match="shard-000001"):
        run(_config(tmp_path / "shards", tmp_path / "out.zarr", num_workers=2, retries=0))
    store = FeatureStore.open(str(tmp_path / "out.zarr"))
    assert sorted(store.committed()) == ["shard-000000", "shard-000002"]
    assert "shard-000001" in json.dumps(store.status_manifest()["shards"][1])
    assert not multiprocessing.active_children()
    # a reader started for a shard the device does not take (another run committed it meanwhile) is stopped
    from neuropredictor.pipeline.readahead import Readahead

    shards = list_shards(str(tmp_path / "shards"))
    ahead = Readahead()
    from neuropredictor.corpus import read_shard

    ahead.start("cpu", shards[0], lambda s: iter(read_shard(s, None, 2, num_workers=2)))
    assert ahead.take("cpu", shards[2]) is None  # stopped once open: the shard taken does not wait for it
    deadline = time.monotonic() + 60
    while multiprocessing.active_children():
        assert time.monotonic() < deadline, "the reader not taken kept its workers"
        time.sleep(0.1)
    ahead.start("cpu", shards[2], lambda s: iter(read_shard(s, None, 2, num_workers=2)))
    taken = ahead.take("cpu", shards[2])
    assert [len(b) for b in taken] == [2, 2, 1]
    ahead.start("cpu", shards[0], lambda s: iter(read_shard(s, None, 2, num_workers=2)))
    ahead.close()
    assert not multiprocessing.active_children()
    ahead.start("cpu", shards[0], lambda s: iter(read_shard(s, None, 2, num_workers=2)))  # closed: nothing starts
    assert ahead.take("cpu", shards[0]) is None


def test_a_readahead_never_hides_an_interrupt_or_holds_a_shard_it_could_not_start(monkeypatch):
    from concurrent.futures import Future

    from neuropredictor.pipeline.readahead import Readahead
    from neuropredictor.shard import Shard

    class Waiting(Future):  # Ctrl-C (or a Prefect cancel) lands while close waits for a reader to open
        def exception(self, timeout=None):
            raise KeyboardInterrupt

    ahead, shard = Readahead(), Shard("x/s.tar", "s", 1, 0)
    ahead._started["cpu"] = ("s", Waiting())
    with pytest.raises(KeyboardInterrupt):
        ahead.close()
    # no thread to be had: nothing is promised, and the shard is read at its turn as without a readahead
    ahead = Readahead()
    monkeypatch.setattr(threading.Thread, "start", lambda self: (_ for _ in ()).throw(RuntimeError("no thread")))
    ahead.start("cpu", shard, lambda s: iter([]))
    assert ahead.take("cpu", shard) is None
