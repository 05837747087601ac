"""`neuropredictor sweep` from the command line: each model's store equals an `extract` with the same
options (`--layers auto` included), the comparison ranks the model the neural data was planted from, a
re-run skips every model, a sweep file may set options per model, and a failing model fails the command
(exit code 1) only after the others completed."""

from __future__ import annotations

import json

import pytest
import yaml
from sweep_data import CUSTOM, assert_identical_stores, gratings, planted_neural
from typer.testing import CliRunner

from neuropredictor.cli import app
from neuropredictor.corpus import make_shards
from neuropredictor.store import FeatureStore
from neuropredictor.sweep import slug

MODELS = [CUSTOM, "torchvision:resnet18"]
PLANTED = (CUSTOM, "features.1")  # the model and layer the neural data is made from
RUN = ["--layers", "auto", "--reduce", "avgpool", "--no-pretrained", "--batch-size", "8", "--num-workers", "0",
       "--retries", "0", "--no-prefect"]
SCORE = ["--alphas", "logspace:-2:4:7", "--inner-folds", "3", "--permutations", "200"]


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def _auto_layers(spec: str) -> list[str]:
    listed = _invoke(["layers", spec, "--no-pretrained", "--preset", "auto", "--json"])
    assert listed.exit_code == 0, listed.output
    return [layer["name"] for layer in json.loads(listed.stdout)["layers"]]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-sweep")
    gratings(root / "imgs", 100)
    make_shards(root / "imgs", str(root / "shards"), maxcount=50)
    # each model extracted on its own by `extract --layers auto`; the neural data is planted from one of them
    for spec in MODELS:
        done = _invoke(["extract", "--corpus", str(root / "shards"), "--model", spec, "--out",
                        str(root / f"single-{slug(spec)}.zarr"), *RUN])
        assert done.exit_code == 0, done.output
    planted_neural(str(root / f"single-{slug(PLANTED[0])}.zarr"), PLANTED[1], root / "neural.npz")
    return root


@pytest.fixture(scope="module")
def swept(root):
    args = ["sweep", "--corpus", str(root / "shards"), "--models", ",".join(MODELS), "--out", str(root / "out"),
            *RUN, "--neural", str(root / "neural.npz"), *SCORE]
    result = _invoke([*args, "--json"])
    assert result.exit_code == 0, result.output
    return args, json.loads(result.stdout)


def test_extract_takes_the_auto_preset(root):
    for spec in MODELS:
        manifest = FeatureStore.open(str(root / f"single-{slug(spec)}.zarr"), mode="r").manifest
        assert [layer["name"] for layer in manifest["layers"]] == _auto_layers(spec)
    assert _auto_layers(CUSTOM) == ["features.1", "features.4", "features.5"]  # the last module per resolution


def test_each_store_equals_extract_and_the_planted_model_ranks_first(root, swept):
    _, report = swept
    assert [m["model"] for m in report["models"]] == MODELS and report["failed"] == []
    rows = 0
    for spec in MODELS:
        store = root / "out" / f"{slug(spec)}.zarr"
        assert store.is_dir() and (root / "out" / f"{slug(spec)}-scores.zarr").is_dir()
        assert_identical_stores(str(root / f"single-{slug(spec)}.zarr"), str(store))
        rows += 2 * len(_auto_layers(spec))  # ROIs: all targets and V1
    table = (root / "out" / "comparison.csv").read_text().splitlines()
    assert table[0].startswith("model,n_stimuli,roi,layer,median_r") and len(table) - 1 == rows
    assert report["csv"] == str(root / "out" / "comparison.csv")
    assert (root / "out" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for roi in ("all", "V1"):
        ranked = report["ranking"][roi]
        assert [e["rank"] for e in ranked] == [1, 2]
        assert (ranked[0]["model"], ranked[0]["layer"]) == PLANTED and ranked[0]["above_chance"] is True
        assert ranked[0]["median_r"] > ranked[1]["median_r"]


def test_a_rerun_skips_every_model(root, swept):
    args, _ = swept
    again = _invoke([*args, "--json"])
    assert again.exit_code == 0, again.output
    assert [m["skipped"] for m in json.loads(again.stdout)["models"]] == [True, True]
    assert again.stderr.count("skipped: already extracted; scores already made") == 2
    table = _invoke(args)  # for people: a line per model, the ranking per ROI, where the outputs are
    assert table.exit_code == 0, table.output
    assert "ROI V1: models ranked" in table.stdout and "comparison.csv" in table.stdout
    first_row = next(line for line in table.stdout.splitlines() if line.strip("│ ").startswith("1 "))
    assert "custom:" in first_row and "features.1" in first_row
    checked = _invoke([*args, "--verify"])  # every store read back: nothing left to extract (was "extracted (")
    assert checked.exit_code == 0, checked.output
    assert checked.stderr.count("already extracted (") == 2 and "img/s" not in checked.stderr


def test_a_sweep_file_with_a_per_model_override_and_a_failing_model(root, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "corpus": str(root / "shards"), "out": str(tmp_path / "out"), "layers": ["auto"], "reduce": "avgpool",
        "pretrained": False, "batch_size": 8, "num_workers": 0, "retries": 0, "dtype": "float16", "precision": "bf16",
        "models": ["torchvision:resnet19", {"spec": CUSTOM, "layers": ["features.4"], "reduce": "pool:2"}]}))
    result = _invoke(["sweep", str(spec), "--dtype", "float32", "--no-prefect", "--json"])  # an option on top of the file
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["failed"] == ["torchvision:resnet19"]
    assert "resnet18" in report["models"][0]["error"]  # the close names of the unknown model
    assert report["models"][1]["status"] == "done"
    assert "failed" in result.stderr and "run the same sweep again" in result.stderr
    manifest = FeatureStore.open(str(tmp_path / "out" / f"{slug(CUSTOM)}.zarr"), mode="r").manifest
    assert [(layer["name"], layer["reduction"]) for layer in manifest["layers"]] == [("features.4", "pool:2")]
    record = json.loads((tmp_path / "out" / "sweep.json").read_text())
    options = record["models"][CUSTOM]["extract"]["options"]
    assert options["dtype"] == "float32" and options["precision"] == "bf16"  # the option given; the file's, not the default
    # the model's options change: its store was made with others, and the message names the flag that replaces it
    changed = _invoke(["sweep", str(spec), "--models", CUSTOM, "--reduce", "pool:2", "--no-prefect"])
    assert changed.exit_code == 1 and "--overwrite" in changed.stderr and "overwrite=True" not in changed.stderr
    replaced = _invoke(["sweep", str(spec), "--models", CUSTOM, "--reduce", "pool:2", "--overwrite", "--no-prefect"])
    assert replaced.exit_code == 0, replaced.output


def test_missing_options_name_what_to_give(tmp_path):
    result = _invoke(["sweep", "--models", CUSTOM, "--out", str(tmp_path / "out"), "--no-prefect"])
    assert result.exit_code == 2 and "--corpus" in result.output and "SWEEP.yaml" in result.output
    bad = _invoke(["sweep", str(tmp_path / "missing.yaml"), "--no-prefect"])
    assert bad.exit_code == 2 and "missing.yaml" in bad.output


@pytest.mark.parametrize("where", ["top", "encode"])
def test_a_command_line_encode_flag_in_a_sweep_file_says_where_it_goes(tmp_path, where):
    # explorer: `encode_device: cpu` was answered "did you mean 'encode'?", which does not say how
    fields = {"corpus": "shards", "models": [CUSTOM], "out": str(tmp_path / "out")}
    fields |= {"encode_device": "cpu"} if where == "top" else {"encode": {"encode_device": "cpu"}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(fields))
    result = _invoke(["sweep", str(tmp_path / "sweep.yaml"), "--no-prefect"])
    assert result.exit_code == 2, result.output
    assert "in a sweep file it is `encode: {device: ...}` (--encode-device on the command line)" in " ".join(
        result.output.split()), result.output


def test_with_prefect_the_sweep_is_the_flow_and_a_failure_still_reports(root, tmp_path, prefect_api):
    args = ["sweep", "--corpus", str(root / "shards"), "--models", f"torchvision:resnet19,{CUSTOM}", "--out",
            str(tmp_path / "out"), *RUN[:-1], "--neural", str(root / "neural.npz"), *SCORE, "--prefect", "--json"]
    result = _invoke(args)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["failed"] == ["torchvision:resnet19"] and report["models"][1]["status"] == "done"
    assert report["models"][1]["scores"] and report["ranking"]["V1"][0]["model"] == CUSTOM
    # the flow's events reach the progress, each model's line after its scoring, as without Prefect
    assert "[2/2]" in result.stderr and "started" in result.stderr and "; scored" in result.stderr
    assert "ModelSpecError" in report["models"][0]["error"]  # the subflow's own error, as the library records it
    assert FeatureStore.open(str(tmp_path / "out" / f"{slug(CUSTOM)}.zarr"), mode="r").manifest["status"] == "complete"


def test_sweep_verify_reads_every_store_back_and_repairs_a_damaged_shard(root, tmp_path):
    args = ["sweep", "--corpus", str(root / "shards"), "--models", CUSTOM, "--out", str(tmp_path / "out"), *RUN]
    assert _invoke(args).exit_code == 0
    store = tmp_path / "out" / f"{slug(CUSTOM)}.zarr"
    chunk = next(p for p in sorted((store / "features").rglob("*")) if p.is_file() and "c" in p.parts)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert _invoke(["inspect", str(store), "--verify"]).exit_code == 1
    skipped = _invoke([*args, "--json"])  # a finished model is skipped without reading its store...
    assert skipped.exit_code == 0 and json.loads(skipped.stdout)["models"][0]["skipped"]
    repaired = _invoke([*args, "--verify", "--json"])  # ...unless --verify
    assert repaired.exit_code == 0, repaired.output
    assert not json.loads(repaired.stdout)["models"][0]["skipped"]
    assert _invoke(["inspect", str(store), "--verify"]).exit_code == 0
    again = _invoke([*args, "--json"])  # --verify left the record as it was: skipped again
    assert json.loads(again.stdout)["models"][0]["skipped"]


def test_each_option_lands_in_its_field(monkeypatch, tmp_path):
    """Options are SweepConfig's fields by name, the encoding's by EncodeSettings' (with `--encode-` where
    both have one); flags that read otherwise (--retry-delay, --no-pretrained) still reach their field."""
    import neuropredictor.cli.sweep as cli_sweep

    seen = {}

    def capture(config, use_prefect):
        seen["config"] = config
        return {"out": config.out, "models": [], "failed": []}

    monkeypatch.setattr(cli_sweep, "_run", capture)
    result = _invoke(["sweep", "--corpus", str(tmp_path), "--models", MODELS[1], "--out", str(tmp_path / "out"),
                      "--retry-delay", "2.5", "--no-pretrained", "--device", "cpu", "--encode-device", "cuda",
                      "--folds", "4", "--keys", "keys.txt", "--no-prefect"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.retry_delay_seconds, config.pretrained, config.device) == (2.5, False, "cpu")
    assert (config.encode.device, config.encode.folds, config.encode.keys_file) == ("cuda", 4, "keys.txt")
