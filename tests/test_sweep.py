"""Model sweeps: each model's store equals a single extraction bit for bit, a killed sweep resumes to the
same stores, and the comparison finds the model and layer that the neural data was made from."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_images
from sweep_data import CUSTOM, assert_identical_stores, gratings, planted_neural

from neuropredictor import ExtractConfig, run
from neuropredictor.corpus import make_shards
from neuropredictor.sweep import SweepConfig, run_sweep, slug

MODELS = ["torchvision:resnet18", "timm:vit_tiny_patch16_224", CUSTOM]
PLANTED = (CUSTOM, "features.1")  # the model and layer the neural data is made from


def _sweep(corpus: Path, out: Path, models=MODELS, **kw) -> SweepConfig:
    base = dict(corpus=str(corpus), models=models, out=str(out), layers=["auto"], reduce="avgpool", pretrained=False,
                batch_size=8, num_workers=0, retries=0)
    return SweepConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    gratings(root / "imgs", 100)
    make_shards(root / "imgs", str(root / "shards"), maxcount=50)
    # the neural data comes from the planted model's layer, extracted on its own
    alone = str(root / "alone.zarr")
    run(ExtractConfig(corpus=str(root / "shards"), model=PLANTED[0], layers=["auto"], reduce="avgpool", out=alone,
                      pretrained=False, batch_size=8, num_workers=0))
    planted_neural(alone, PLANTED[1], root / "neural.npz")
    sweep = _sweep(root / "shards", root / "out", neural=str(root / "neural.npz"),
                   encode={"alphas": "logspace:-2:4:7", "inner_folds": 3, "permutations": 200})
    return root, sweep, run_sweep(sweep)


def test_each_store_equals_a_single_extraction(swept):
    root, sweep, summary = swept
    assert [m["status"] for m in summary["models"]] == ["done"] * 3 and summary["failed"] == []
    for model in sweep.models:
        store = root / "out" / f"{slug(model.spec)}.zarr"
        assert store.is_dir()
        single = str(root / f"single-{slug(model.spec)}.zarr")
        manifest = run(ExtractConfig(corpus=str(root / "shards"), model=model.spec, layers=["auto"], reduce="avgpool",
                                     out=single, pretrained=False, batch_size=8, num_workers=0))
        assert_identical_stores(single, str(store))
        assert json.loads((store / "manifest.json").read_text())["config_hash"] == manifest["config_hash"]
    assert slug("timm:vit_tiny_patch16_224") == "timm_vit_tiny_patch16_224"


def test_comparison_ranks_the_planted_model_and_layer_first(swept):
    root, sweep, summary = swept
    table = (root / "out" / "comparison.csv").read_text().splitlines()
    assert table[0].startswith("model,n_stimuli,roi,layer,median_r")
    assert len(table) - 1 == sum(2 * len(m["extract"]["layers"]) for m in summary["models"])  # all + V1 per layer
    for roi in ("all", "V1"):
        first = summary["comparison"]["ranking"][roi][0]
        assert (first["model"], first["layer"]) == PLANTED and first["above_chance"] is True
        others = [e["median_r"] for e in summary["comparison"]["ranking"][roi][1:]]
        assert first["median_r"] > max(others) + 0.05  # the other models' best layers
    png = (root / "out" / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_rerun_skips_finished_models(swept):
    root, sweep, _ = swept
    before = {p: p.stat().st_mtime_ns for p in (root / "out").rglob("_status/*.json")}
    summary = run_sweep(sweep)
    assert all(m["extract"]["skipped"] and m["encode"]["skipped"] for m in summary["models"])
    assert before == {p: p.stat().st_mtime_ns for p in before}


def test_a_sweep_killed_in_its_second_model_resumes_to_the_same_stores(tmp_path):
    make_images(tmp_path / "imgs", 24, nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=4)
    models = [CUSTOM, "torchvision:resnet18"]
    sweep = _sweep(tmp_path / "shards", tmp_path / "out", models=models, batch_size=2)
    script = textwrap.dedent("""
        import os, signal, sys
        from neuropredictor.sweep import SweepConfig, run_sweep
        sweep = SweepConfig.model_validate_json(sys.argv[1])
        state = {"model": -1, "shards": 0}
        def on_event(event, data):
            if event == "model":
                state["model"] = data["index"]
            if event == "shard" and state["model"] == 1:
                state["shards"] += 1
                if state["shards"] == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
        run_sweep(sweep, on_event)
        """)
    proc = subprocess.run([sys.executable, "-c", script, sweep.model_dump_json()], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    second = tmp_path / "out" / f"{slug(models[1])}.zarr"
    assert len(list((second / "_status").glob("*.json"))) == 2  # half done
    summary = run_sweep(sweep)
    assert summary["models"][0]["extract"]["skipped"] and not summary["models"][1]["extract"]["skipped"]
    for spec in models:
        single = str(tmp_path / f"single-{slug(spec)}.zarr")
        run(sweep.extract_config(sweep.models[models.index(spec)]).model_copy(update={"out": single}))
        assert_identical_stores(single, str(tmp_path / "out" / f"{slug(spec)}.zarr"))


def test_a_failing_model_is_reported_and_the_others_complete(tmp_path):
    make_images(tmp_path / "imgs", 8, nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=4)
    sweep = _sweep(tmp_path / "shards", tmp_path / "out", models=["torchvision:resnet19", CUSTOM])
    summary = run_sweep(sweep)
    assert summary["failed"] == ["torchvision:resnet19"]
    assert "resnet18" in summary["models"][0]["extract"]["error"]  # the close names of the unknown model
    assert summary["models"][1]["status"] == "done"
    from neuropredictor.sweep import failure_message

    assert "run the same sweep again" in failure_message(summary)
    assert failure_message({"models": summary["models"][:1]}).startswith("every model failed;")


def test_a_sweep_where_every_model_failed_names_the_comparison_it_left_as_an_earlier_runs(tmp_path):
    from neuropredictor.sweep import failure_message
    from neuropredictor.sweep.run import summarize

    (tmp_path / "neural.npz").write_bytes(b"")
    sweep = _sweep(tmp_path, tmp_path / "out", models=[CUSTOM], neural=str(tmp_path / "neural.npz"))
    failed = [{"model": CUSTOM, "status": "failed", "extract": {"status": "failed", "error": "OSError: gone"}}]
    assert "earlier" not in failure_message(summarize(sweep, failed))  # none there
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "comparison.csv").write_text("model,layer\n")
    said = failure_message(summarize(sweep, failed))
    assert said.startswith("every model failed") and f"{tmp_path / 'out'}/comparison.csv is an earlier run's" in said


def test_neural_data_that_cannot_be_used_fails_before_any_model_runs(tmp_path):
    # was found after the first model's whole extraction
    make_images(tmp_path / "imgs", 6, nested=False)
    keys = [f"stim/img{i:04d}.jpg" for i in range(6)]  # written with folder and extension: match no image
    np.savez(tmp_path / "neural.npz", data=np.zeros((6, 2)), keys=np.array(keys))
    sweep = _sweep(tmp_path / "imgs", tmp_path / "out", models=[CUSTOM], neural=str(tmp_path / "neural.npz"))
    from neuropredictor.encode import EncodingError

    with pytest.raises(EncodingError, match=r"no stimulus key of the neural data \(6 keys.*is an image of the corpus "
                                            r"\(6 images, e.g. 'img0000'.*nothing was extracted.*6 neural keys would "
                                            r"match after dropping folders and file extensions"):
        run_sweep(sweep)
    bad_roi = _sweep(tmp_path / "imgs", tmp_path / "out", models=[CUSTOM], neural=str(tmp_path / "neural.npz"),
                     encode={"roi": "nope"})
    with pytest.raises(EncodingError, match="roi 'nope' is neither"):
        run_sweep(bad_roi)
    assert not Path(sweep.store_url(sweep.models[0])).exists() and not list(tmp_path.rglob("*.shards"))


def test_a_rerun_redoes_what_changed_since(tmp_path):
    # Skipping compared options only: a corpus changed behind a store kept its old features, and a replaced
    # neural data file kept the old scores.
    gratings(tmp_path / "imgs", 24)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=12)
    alone = str(tmp_path / "alone.zarr")
    run(ExtractConfig(corpus=str(tmp_path / "shards"), model=CUSTOM, layers=["auto"], reduce="avgpool", out=alone,
                      pretrained=False, batch_size=8, num_workers=0))
    planted_neural(alone, PLANTED[1], tmp_path / "neural.npz")
    sweep = _sweep(tmp_path / "shards", tmp_path / "out", models=[CUSTOM], neural=str(tmp_path / "neural.npz"),
                   encode={"alphas": "logspace:-2:4:7", "inner_folds": 3, "permutations": 20})
    first = run_sweep(sweep)["models"][0]
    assert first["status"] == "done" and not first["encode"]["skipped"]
    unchanged = run_sweep(sweep)["models"][0]
    assert unchanged["extract"]["skipped"] and unchanged["encode"]["skipped"]
    # scores made before the splits were placed by key hash: on other splits, so made again, not compared
    record = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert record["models"][CUSTOM]["encode"]["options"].pop("split_scheme") == "key-hash/1"
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(record))
    assert not run_sweep(sweep)["models"][0]["encode"]["skipped"]

    planted_neural(alone, PLANTED[1], tmp_path / "neural.npz", seed=1)  # new neural data, same path
    rescored = run_sweep(sweep)["models"][0]
    assert rescored["extract"]["skipped"] and not rescored["encode"]["skipped"]

    gratings(tmp_path / "other", 24, seed=5)  # other images, same shard names and counts
    make_shards(tmp_path / "other", str(tmp_path / "shards"), maxcount=12, overwrite=True)
    changed = run_sweep(sweep)["models"][0]
    assert changed["status"] == "failed" and "changed since their rows were extracted" in changed["extract"]["error"]


def test_a_custom_factory_with_a_retrained_checkpoint_is_not_skipped(tmp_path):
    # its store was skipped as finished: the factory's weights were named "factory", whatever it loaded
    import torch

    from neuropredictor.models import load_model

    (tmp_path / "lab.py").write_text(
        "from pathlib import Path\nimport torch\nfrom custom_models import cifar_cnn\n\n"
        "def net():\n    m, transform = cifar_cnn()\n"
        "    m.load_state_dict(torch.load(Path(__file__).with_name('ckpt.pt'), weights_only=True))\n"
        "    return m, transform\n")
    make_images(tmp_path / "imgs", 8, nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=4)
    state = load_model(CUSTOM, pretrained=False).module.state_dict()
    torch.save(state, tmp_path / "ckpt.pt")
    sweep = _sweep(tmp_path / "shards", tmp_path / "out", models=[f"custom:{tmp_path / 'lab.py'}:net"],
                   layers=["features.5"])
    assert run_sweep(sweep)["models"][0]["status"] == "done"
    assert run_sweep(sweep)["models"][0]["extract"]["skipped"]
    torch.save({k: v * 2 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "ckpt.pt")
    retrained = run_sweep(sweep)["models"][0]
    assert retrained["status"] == "failed" and "weights" in retrained["extract"]["error"]


def test_a_custom_model_whose_code_changed_is_not_skipped(tmp_path):
    # same weights, a forward pass fixed in its file: the sweep skipped the store made by the old code
    import os

    (tmp_path / "lab_code.py").write_text(
        "from custom_models import cifar_cnn\n\ndef net():\n    return cifar_cnn()\n")
    make_images(tmp_path / "imgs", 8, nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=4)
    sweep = _sweep(tmp_path / "shards", tmp_path / "out", models=[f"custom:{tmp_path / 'lab_code.py'}:net"],
                   layers=["features.5"])
    assert run_sweep(sweep)["models"][0]["status"] == "done"
    assert run_sweep(sweep)["models"][0]["extract"]["skipped"]
    source = tmp_path / "lab_code.py"
    source.write_text(source.read_text() + "# the forward pass, fixed\n")
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    changed = run_sweep(sweep)["models"][0]
    assert changed["status"] == "failed" and "config.code" in changed["extract"]["error"]


def test_the_record_vouches_only_for_its_own_store_and_runtime_options_reload_nothing(tmp_path):
    # A store replaced by an `extract --overwrite` with other layers was skipped as the sweep's, and scored
    # under its name; a new batch size reloaded every finished model and recorded its rate as 0.0 img/s.
    from neuropredictor.pipeline import replicas

    make_images(tmp_path / "imgs", 8, nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=4)
    sweep = _sweep(tmp_path / "shards", tmp_path / "out", models=[CUSTOM], layers=["features.5"])
    first = run_sweep(sweep)["models"][0]["extract"]
    assert replicas._RUNNERS == {}  # released once extracted: not held while scoring or the next model runs
    again = run_sweep(sweep.model_copy(update={"batch_size": 3, "num_workers": 1, "retries": 2}))["models"][0]
    assert again["extract"]["skipped"] and again["extract"]["images_per_s"] == first["images_per_s"] > 0
    store = sweep.store_url(sweep.models[0])
    run(sweep.extract_config(sweep.models[0]).model_copy(update={"layers": ["features.2"], "overwrite": True}))
    replaced = run_sweep(sweep)["models"][0]
    assert replaced["status"] == "failed"  # extracted, not skipped: refused as another configuration
    assert "layers" in replaced["extract"]["error"] and "overwrite" in replaced["extract"]["error"]
    assert json.loads(Path(store, "manifest.json").read_text())["config"]["layers"] == ["features.2"]


def test_two_sweeps_into_one_folder_keep_each_others_records(tmp_path):
    # each wrote back the whole record it had read at its start: the other's models vanished from sweep.json
    from neuropredictor.sweep.run import SweepRecord

    make_images(tmp_path / "imgs", 4, nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=4)
    one, two = (_sweep(tmp_path / "shards", tmp_path / "out", models=[m]) for m in (CUSTOM, "torchvision:alexnet"))
    early = SweepRecord(one)  # read before the other sweep ran
    run_sweep(two)
    early.mark(CUSTOM, "extract", {}, "done")
    assert set(json.loads((tmp_path / "out" / "sweep.json").read_text())["models"]) == {CUSTOM, "torchvision:alexnet"}
    with pytest.raises(ValueError, match=r"'a-scores' would store its features where 'a' keeps its scores"):
        _sweep(tmp_path, tmp_path / "out", models=[{"spec": CUSTOM, "name": "a"}, {"spec": CUSTOM, "name": "a-scores"}])


def test_models_scored_on_different_stimuli_are_named(tmp_path):
    # a model that could not use some images (its transform refused them) was ranked beside the others as if
    # scored on the same stimuli, and the random split of every other stimulus changed with the count
    from neuropredictor.encode.align import outer_splits

    keys = [f"img{i:03d}" for i in range(40)]
    test = lambda ks: {ks[i] for i in outer_splits(ks, None, 0.25, None, 0)["splits"][0][1]}  # noqa: E731
    assert test(keys) - {"img005"} <= test([k for k in keys if k != "img005"])
    (tmp_path / "picky.py").write_text(
        "from custom_models import cifar_cnn\n\n"
        "def net():\n    m, transform = cifar_cnn()\n"
        "    def picky(image):\n"
        "        if image.getpixel((0, 0)) == (0, 0, 0):\n            raise ValueError('too dark')\n"
        "        return transform(image)\n"
        "    return m, picky\n")
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        pixels = rng.integers(1, 255, (32, 32, 3), dtype=np.uint8)
        pixels[0, 0] = 0 if i == 5 else pixels[0, 0]
        Image.fromarray(pixels).save(tmp_path / "imgs" / f"img{i:03d}.png")
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=20)
    np.savez(tmp_path / "neural.npz", data=rng.standard_normal((40, 3)), keys=np.array(keys))
    sweep = _sweep(tmp_path / "shards", tmp_path / "out", models=[CUSTOM, f"custom:{tmp_path / 'picky.py'}:net"],
                   layers=["features.5"], neural=str(tmp_path / "neural.npz"),
                   encode={"alphas": "1,100", "inner_folds": 3, "permutations": 0})
    summary = run_sweep(sweep)
    assert "fewer for custom:" in summary["comparison"]["warning"] and "(39)" in summary["comparison"]["warning"]
    table = (tmp_path / "out" / "comparison.csv").read_text().splitlines()
    assert table[0].startswith("model,n_stimuli,") and {row.split(",")[1] for row in table[1:]} == {"40", "39"}


def test_the_sweep_record_holds_no_credentials(tmp_path):
    # sweep.json sits next to the data, like the manifest: URLs lose their passwords and signed query values
    from neuropredictor.sweep.run import SweepRecord

    sweep = _sweep(tmp_path / "shards", tmp_path / "out", models=[CUSTOM],
                   neural="https://alice:s3cr3t@example.org/neural.npz?X-Amz-Signature=abc123",
                   encode={"key_column": "stimulus"})
    record = SweepRecord(sweep)
    options = {"neural": sweep.neural, "key_column": "stimulus"}
    record.mark(CUSTOM, "encode", options, "done", error="GET https://alice:s3cr3t@example.org failed")
    text = (tmp_path / "out" / "sweep.json").read_text()
    assert "s3cr3t" not in text and "abc123" not in text and '"key_column": "stimulus"' in text
    assert record.done(CUSTOM, "encode", options)


def test_the_ranking_keeps_an_roi_without_a_finite_score():
    # An ROI whose targets are all NaN (not covered by a subject's scan) has no finite median r for any layer:
    # the ranking fell back to idxmax over NaN and the sweep ended in a bare pandas error, without its plot.
    import pandas as pd

    from neuropredictor.sweep.compare import COLUMNS, ranking

    rows = [[m, 40, roi, layer, r, r, r, np.nan, 0.1, 0.01, 0.02, r is not np.nan and r > 0.1, False]
            for m, scores in (("a", (0.3, 0.5)), ("b", (0.2, 0.05)))
            for roi in ("V1", "bad") for layer, r in zip(("l1", "l2"), scores if roi == "V1" else (np.nan,) * 2)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.loc[(table.model == "a") & (table.layer == "l2") & (table.roi == "V1"), "best"] = True
    ranked = ranking(table)
    assert [(e["model"], e["layer"], e["median_r"]) for e in ranked["V1"]] == [("a", "l2", 0.5), ("b", "l1", 0.2)]
    assert [e["median_r"] for e in ranked["bad"]] == [None, None]


def test_the_comparison_plot_wraps_its_rois_and_leaves_the_callers_backend(tmp_path):
    # pyplot with matplotlib.use("Agg") switched a notebook's backend when a sweep ran in it; and every ROI sat in
    # one row of panels
    import matplotlib
    import pandas as pd

    from neuropredictor.sweep.compare import COLUMNS, plot_comparison

    rois = ["all", "V1", "V2", "V4", "IT"]
    rows = [[m, 40, roi, "l1", r, r - 0.1, r + 0.1, np.nan, 0.05, 0.001, 0.002, True, True]
            for m, r in (("a", 0.3), ("b", 0.2)) for roi in rois]
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        png = Path(plot_comparison(pd.DataFrame(rows, columns=COLUMNS), str(tmp_path / "c.png"))).read_bytes()
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    # 3 panels a row, 2 rows (the saved image is trimmed to what is drawn: a little under the figure's size)
    assert 2.5 * 6.5 * 110 < width <= 3 * 6.5 * 110 and height > 2 * 1.6 * 110, (width, height)


def test_two_checkpoints_of_one_architecture_run_under_their_names(tmp_path):
    # A model's store, scores and record are named by its slug: two entries of one spec (two checkpoints of an
    # architecture) or specs that slug alike overwrote each other's store and shared one record. They are
    # refused now, and run side by side once each has a name.
    import torch

    from neuropredictor import open_features
    from neuropredictor.models import load_model

    with pytest.raises(ValueError, match="would share one store.*own `name`"):
        _sweep(tmp_path, tmp_path / "out", models=[{"spec": CUSTOM, "weights": "a.pt"}, {"spec": CUSTOM, "weights": "b.pt"}])
    with pytest.raises(ValueError, match="'custom:a/b.py:f' and 'custom:a_b.py:f'"):
        _sweep(tmp_path, tmp_path / "out", models=["custom:a/b.py:f", "custom:a_b.py:f"])
    # a malformed spec is refused with the sweep, not after the models before it ran
    with pytest.raises(ValueError, match=r"unknown model source 'tim' in 'tim:resnet34' \(did you mean 'timm'"):
        _sweep(tmp_path, tmp_path / "out", models=["timm:resnet18", "tim:resnet34"])

    make_images(tmp_path / "imgs", 8, nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=4)
    state = load_model(CUSTOM, pretrained=False).module.state_dict()
    for scale in (1, 3):
        torch.save({k: v * scale if v.is_floating_point() else v for k, v in state.items()}, tmp_path / f"ep{scale}.pt")
    models = [{"spec": CUSTOM, "weights": str(tmp_path / f"ep{scale}.pt"), "name": f"net-ep{scale}"} for scale in (1, 3)]
    sweep = _sweep(tmp_path / "shards", tmp_path / "out", models=models, layers=["features.5"])
    summary = run_sweep(sweep)
    assert [m["model"] for m in summary["models"]] == ["net-ep1", "net-ep3"] and not summary["failed"]
    a, b = (open_features(str(tmp_path / "out" / f"net-ep{scale}.zarr"))["features.5"].values for scale in (1, 3))
    assert not np.allclose(a, b)
    assert set(json.loads((tmp_path / "out" / "sweep.json").read_text())["models"]) == {"net-ep1", "net-ep3"}
    assert all(m["extract"]["skipped"] for m in run_sweep(sweep)["models"])


def test_a_resumed_model_reports_the_rate_of_the_rows_it_extracted(tmp_path):
    # a store half done by an earlier run: its rate is this run's rows over this run's time (it counted every
    # committed row, the earlier run's too)
    from neuropredictor import extract_shard, plan

    make_images(tmp_path / "imgs", 40, nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=10)
    sweep = _sweep(tmp_path / "shards", tmp_path / "out", models=[CUSTOM])
    config = sweep.extract_config(sweep.models[0])
    store = plan(config)
    for shard in store.shards[:3]:
        extract_shard(config, shard, store)
    time.sleep(1.1)  # commit times have second precision
    info = run_sweep(sweep)["models"][0]["extract"]
    assert info["rows"]["committed"] == 40 and not info["skipped"]
    # 10 rows, not 40 (seconds are rounded to 10 ms, of a run this short)
    assert info["images_per_s"] * info["seconds"] == pytest.approx(10, rel=0.3)


@pytest.mark.parametrize("field", ["out", "corpus", "neural"])
def test_an_empty_sweep_location_is_refused(field):
    # review: out='' put every model's store at the filesystem's root ('/torchvision_resnet18.zarr')
    fields = {"corpus": "shards", "models": ["torchvision:resnet18"], "out": "sweep", "neural": "neural.npz"}
    with pytest.raises(ValueError, match=rf"{field}\n.*is empty: give a local path or a URL"):
        SweepConfig(**(fields | {field: "  "}))
