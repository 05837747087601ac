"""The command line as a user sees it: the progress bar's numbers, summaries and `inspect`, messages."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from click.testing import Result
from rich.progress import Progress
from typer.testing import CliRunner

from conftest import make_images
from neuropredictor import ExtractConfig, run
from neuropredictor.cli import app
from neuropredictor.cli.progress import ProgressListener
from neuropredictor.corpus import make_shards
from neuropredictor.errors import Interrupted
from neuropredictor.store import FeatureStore

CUSTOM = f"custom:{Path(__file__).parent / 'custom_models.py'}:cifar_cnn"  # small and fast, random weights


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_rate_is_images_over_wall_time_from_the_plan_on():
    clock = FakeClock()
    with Progress(disable=True) as progress:
        task = progress.add_task("extract", total=None, rate="-", shards="-")
        listen = ProgressListener(progress, task, clock=clock, window_s=30.0)

        def rate() -> str:
            return progress.tasks[0].fields["rate"]

        listen("planned", {"rows": 1000, "committed_rows": 200, "shards": 10, "committed_shards": 2})
        assert progress.tasks[0].completed == 200 and progress.tasks[0].total == 1000
        clock.now += 2.0  # the first batch took 2 s (model warm-up, first decode): 10 img/s, not millions
        listen("batch", {"images": 20})
        assert rate() == "10"
        for _ in range(4):  # then 20 images a second: the average since the plan, never twice too high
            clock.now += 1.0
            listen("batch", {"images": 20})
        assert rate() == f"{100 / 6:,.0f}"
        for _ in range(60):  # a sliding window: after a while, the recent rate
            clock.now += 1.0
            listen("batch", {"images": 20})
        assert rate() == "20"
        listen("shard", {"name": "s", "record": {}})
        assert progress.tasks[0].fields["shards"] == "3/10"
        assert progress.tasks[0].completed == 200 + 65 * 20


# ---------------------------------------------------------------------------------------------
# summaries: `extract` and `inspect`


def _config(corpus: Path, out: Path, **kw) -> ExtractConfig:
    base = {"corpus": str(corpus), "model": CUSTOM, "layers": ["features.5"], "out": str(out), "batch_size": 2,
            "num_workers": 0, "retries": 0, "retry_delay_seconds": 0}
    return ExtractConfig(**(base | kw))


def _cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    make_images(root / "imgs", 16, nested=False)
    make_shards(root / "imgs", str(root / "shards"), maxcount=4)  # 4 shards of 4
    return root / "shards"


def test_status_words_survive_rich_markup(corpus, tmp_path):
    out = tmp_path / "out.zarr"
    result = _cli("extract", "--corpus", str(corpus), "--model", CUSTOM, "--layers", "features.5", "--out", str(out),
                  "--batch-size", "2", "--num-workers", "0", "--no-prefect")
    assert result.exit_code == 0, result.output
    assert "[complete]" in result.output
    inspected = _cli("inspect", str(out))
    assert inspected.exit_code == 0 and "[complete]" in inspected.output, inspected.output


def test_a_corpus_of_nothing_but_bad_images_is_said_to_hold_no_features(corpus, tmp_path):
    for i in range(3):
        (tmp_path / "bad" / f"b{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "bad" / f"b{i}.jpg").write_bytes(b"not an image")
    args = ["--model", CUSTOM, "--layers", "features.5", "--batch-size", "2", "--num-workers", "0", "--no-prefect"]
    result = _cli("extract", "--corpus", str(tmp_path / "bad"), "--out", str(tmp_path / "bad.zarr"), *args)
    assert result.exit_code == 0 and "3 invalid" in result.output, result.output
    assert "every image written is invalid" in " ".join(result.output.split())  # was [complete] and nothing else
    good = _cli("extract", "--corpus", str(corpus), "--out", str(tmp_path / "good.zarr"), *args)
    assert good.exit_code == 0 and "every image written is invalid" not in " ".join(good.output.split())


def test_an_error_quoting_a_signed_url_is_redacted_on_the_terminal_and_in_the_log(tmp_path, monkeypatch):
    # a presigned .tar URL was printed with its key id and signature
    monkeypatch.setenv("NEUROPREDICTOR_LOG_DIR", str(tmp_path / "logs"))
    signed = f"{tmp_path}/shard.tar?AWSAccessKeyId=AKIAEXAMPLE&Signature=s1gnatureXYZ&Expires=1795559572"
    Path(signed).write_bytes(b"")  # there, but not read as a shard (its name ends in the query)
    result = _cli("extract", "--corpus", signed, "--model", CUSTOM, "--layers", "features.5", "--out",
                  str(tmp_path / "o.zarr"), "--no-prefect")
    assert result.exit_code != 0 and "is not a .tar shard" in " ".join(result.output.split())
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    for text in (result.output.replace("\n", ""), logs):  # a long URL wraps mid-word on the terminal
        assert "AKIAEXAMPLE" not in text and "s1gnatureXYZ" not in text


def test_brackets_in_help_and_paths_are_shown_as_written(tmp_path):
    # rich markup took [@TAG] in the model spec's help, and [v2] in an output folder's name, for tags
    for command in (["extract", "--help"], ["layers", "--help"]):
        result = CliRunner(env={"COLUMNS": "200"}).invoke(app, command)
        assert "SOURCE:NAME[@TAG]" in result.output, result.output
    make_images(tmp_path / "imgs", 3, nested=False)
    result = _cli("shards", "make", str(tmp_path / "imgs"), str(tmp_path / "sh[v2]"))
    assert result.exit_code == 0 and f"{tmp_path / 'sh[v2]'}" in result.output.replace("\n", ""), result.output


@pytest.mark.parametrize("option,words", [(["--maxcount", "0"], "maxcount must be at least 1"),
                                          (["--prefix", "my.set"], "prefix must be a non-empty name")])
def test_shards_make_bad_options_are_one_error_line(tmp_path, option, words):
    make_images(tmp_path / "imgs", 2, nested=False)
    result = _cli("shards", "make", str(tmp_path / "imgs"), str(tmp_path / "sh"), *option)
    assert result.exit_code == 2 and words in result.output and "traceback" not in result.output, result.output


@pytest.mark.parametrize("option,line", [
    (["--batch-size", "0"], "error: --batch-size: Input should be greater than or equal to 1 (got 0)"),
    (["--precision", "FP16"], "error: --precision: Input should be 'fp32', 'bf16' or 'fp16' (got 'FP16')")])
def test_invalid_values_are_one_line_naming_the_flag(corpus, tmp_path, option, line):
    # pydantic's block: "1 validation error for ExtractConfig / batch_size / ... https://errors.pydantic.dev"
    result = _cli("extract", "--corpus", str(corpus), "--model", CUSTOM, "--layers", "features.2", "--out",
                  str(tmp_path / "o.zarr"), *option)
    assert result.exit_code == 2 and " ".join(result.output.split()) == line, result.output


def test_a_sweep_file_with_an_unknown_key_names_it_and_the_close_one(tmp_path):
    (tmp_path / "s.yaml").write_text(f"corpus: x\nout: {tmp_path / 'o'}\nmodels: [{{spec: {CUSTOM}, layer: a}}]\n"
                                     "pretrianed: false\n")
    result = _cli("sweep", str(tmp_path / "s.yaml"))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "validation error" not in text
    assert "unknown option 'models.0.layer' (did you mean --layers?)" in text
    assert "unknown option 'pretrianed' (did you mean --pretrained?)" in text


def test_shards_make_into_another_corpus_needs_overwrite(tmp_path):
    make_images(tmp_path / "imgs", 4, nested=False)
    assert _cli("shards", "make", str(tmp_path / "imgs"), str(tmp_path / "sh"), "--maxcount", "2").exit_code == 0
    refused = _cli("shards", "make", str(tmp_path / "imgs"), str(tmp_path / "sh"), "--maxcount", "4")
    assert refused.exit_code == 2 and "pass --overwrite to replace them" in refused.output.replace("\n", " ")
    assert len(list((tmp_path / "sh").glob("*.tar"))) == 2
    replaced = _cli("shards", "make", str(tmp_path / "imgs"), str(tmp_path / "sh"), "--maxcount", "4", "--overwrite")
    assert replaced.exit_code == 0 and len(list((tmp_path / "sh").glob("*.tar"))) == 1


def test_an_option_of_one_value_given_twice_is_refused(corpus, tmp_path):
    # click kept the last: `--model a --model b` extracted b alone, without a word
    result = _cli("extract", "--corpus", str(corpus), "--model", CUSTOM, "--model", "timm:resnet18", "--layers",
                  "features.2", "--out", str(tmp_path / "o.zarr"))
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "--model is given more than once; give it once (several models:" in text
    assert not (tmp_path / "o.zarr").exists()
    made = _cli("shards", "make", str(tmp_path), str(tmp_path / "sh"), "--maxcount", "2", "--maxcount=3")
    assert made.exit_code == 2 and "--maxcount is given more than once" in made.output


def test_repeated_corpus_and_layers_options_are_lists(corpus, tmp_path):
    # repeated, each option kept only its last value: one shard of two read, one layer of two stored
    out = tmp_path / "out.zarr"
    result = _cli("extract", "--corpus", str(corpus / "shard-000000.tar"), "--corpus", str(corpus / "shard-000001.tar"),
                  "--model", CUSTOM, "--layers", "features.2", "--layers", "features.5", "--out", str(out),
                  "--batch-size", "2", "--num-workers", "0", "--no-prefect", "--json")
    assert result.exit_code == 0, result.output
    manifest = FeatureStore.open(str(out), mode="r").manifest
    assert manifest["rows"]["total"] == 8 and [lay["name"] for lay in manifest["layers"]] == ["features.2", "features.5"]


_FLAKY = """
import torch
from torch import nn

calls = [0]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        calls[0] += 1
        if calls[0] == 5:  # once, at the second batch of a shard (the first call traces the layers)
            raise RuntimeError("flaky device")
        return self.conv(x).mean(dim=(2, 3))


def make(pretrained=False):
    return Net()
"""


def test_progress_takes_back_the_images_of_a_failed_attempt(corpus, tmp_path):
    # a shard that failed half-way and then succeeded counted its first images twice: 310/300 at the end
    (tmp_path / "flaky.py").write_text(_FLAKY)
    events: list[tuple[str, dict]] = []
    run(_config(corpus, tmp_path / "out.zarr", model=f"custom:{tmp_path / 'flaky.py'}:make", layers=["conv"],
                retries=1), on_event=lambda event, data: events.append((event, data)))
    images = [d["images"] for e, d in events if e == "batch"]
    assert min(images) < 0 and sum(images) == 16
    with Progress(disable=True) as progress:
        task = progress.add_task("extract", total=None, rate="-", shards="-")
        listener = ProgressListener(progress, task)
        for event, data in events:
            listener(event, data)
        assert progress.tasks[0].completed == 16


def test_every_list_option_of_every_command_may_be_repeated(tmp_path):
    # each repeated option kept its last value only: sweep --models, encode --layers, bench --layers
    import typer.main

    from neuropredictor.cli.sweep import _config
    from neuropredictor.config import split_commas
    from neuropredictor.encode.options import EncodeOptions

    commands = typer.main.get_command(app).commands
    sweep = commands["sweep"].make_context("sweep", [
        "--corpus", "a", "--corpus", "b", "--models", "timm:resnet18", "--models", "torchvision:alexnet,clip:RN50",
        "--layers", "auto", "--out", str(tmp_path)])
    config = _config(sweep, None)
    assert [m.spec for m in config.models] == ["timm:resnet18", "torchvision:alexnet", "clip:RN50"]
    assert config.corpus == ["a", "b"]
    encode = commands["encode"].make_context("encode", ["f.zarr", "n.npz", "--out", "s.zarr", "--layers", "layer3",
                                                        "--layers", "layer4,fc"])
    assert EncodeOptions(**{k: v for k, v in encode.params.items() if k in EncodeOptions.model_fields}).layers == [
        "layer3", "layer4", "fc"]
    bench = commands["bench"].make_context("bench", ["--layers", "layer3", "--layers", "layer4"])
    assert split_commas(bench.params["layers"]) == ["layer3", "layer4"]


def test_inspect_counts_the_committed_rows_of_an_interrupted_store(corpus, tmp_path):
    out = tmp_path / "out.zarr"
    stop, shards = threading.Event(), []

    def stop_after_two(event: str, data: dict) -> None:
        if event == "shard":
            shards.append(data["name"])
            if len(shards) == 2:
                stop.set()

    with pytest.raises(Interrupted):
        run(_config(corpus, out), on_event=stop_after_two, stop=stop)
    assert not (out / "manifest.json").exists() or json.loads((out / "manifest.json").read_text())["status"] == "planned"
    summary = json.loads(_cli("inspect", str(out), "--json").output)
    assert summary["rows"]["committed"] == 8 and summary["rows"]["total"] == 16
    assert summary["shards"] == {"total": 4, "committed": 2, "pending": 2}
    text = _cli("inspect", str(out)).output
    assert "rows: 8/16 written" in text and "[planned]" in text and "resumes it" in text
    assert "now run" not in text and summary["extracting"] == []

    # a run extracting the third shard now (another machine): who, and how far
    store = FeatureStore.open(str(out))
    claim = store.claim(store.shards[2])
    claim.progress = lambda: 3
    try:
        claim.renew()
        text = _cli("inspect", str(out)).output
        summary = json.loads(_cli("inspect", str(out), "--json").output)
    finally:
        claim.release()
    assert f"now run {claim.run_id} (extracting {store.shards[2].name}) on host" in text and "3 rows written" in text
    assert [lease["run_id"] for lease in summary["extracting"]] == [claim.run_id]


def test_inspect_and_the_reader_see_commits_made_after_the_finalize(corpus, tmp_path):
    # a finalized store whose commit records changed since (a shard withdrawn as damaged, then a resume
    # interrupted before its finalize): inspect showed the old manifest, "[complete] 4 done"
    from neuropredictor import extract_shard, open_features

    out = tmp_path / "out.zarr"
    run(_config(corpus, out))
    store = FeatureStore.open(str(out))
    store.withdraw({"shard-000001": "checksum differs"})
    summary = json.loads(_cli("inspect", str(out), "--json").output)
    assert summary["status"] == "planned" and summary["shards"]["committed"] == 3 and summary["rows"]["committed"] == 12
    assert open_features(str(out)).attrs["status"] == "planned"
    extract_shard(_config(corpus, out), store.shards[1], FeatureStore.open(str(out)))
    summary = json.loads(_cli("inspect", str(out), "--json").output)
    assert summary["shards"]["committed"] == 4 and summary["status"] == "planned"  # until the next finalize
    run(_config(corpus, out))
    assert json.loads(_cli("inspect", str(out), "--json").output)["status"] == "complete"
    # a copy (cp -r, aws s3 sync) gets new modification times in any order: records newer than the manifest
    # made a finished store read as "planned" (and "a run is extracting into it")
    import os
    import shutil
    import time

    copy = shutil.copytree(out, tmp_path / "copy.zarr")
    later = time.time() + 60
    for record in (copy / "_status").glob("*.json"):
        os.utime(record, (later, later))
    assert json.loads(_cli("inspect", str(copy), "--json").output)["status"] == "complete"


# ---------------------------------------------------------------------------------------------
# models and layers


def test_layers_with_a_checkpoint_that_does_not_fit_prints_one_error_line(tmp_path):
    import open_clip
    import torch

    path = tmp_path / "small-clip.pth"
    torch.save(open_clip.create_model("ViT-S-32", pretrained=None).state_dict(), path)  # a full CLIP of another size
    result = _cli("layers", "openclip:ViT-B-32", "--weights", str(path))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and result.output.count("error:") == 1
    assert "Traceback" not in result.output and len(result.output) < 1000, result.output
    assert "full CLIP checkpoint" in result.output and "keys with other shapes" in result.output


def test_a_layers_pattern_matching_nothing_names_the_closest_layers():
    result = _cli("layers", "torchvision:alexnet", "--no-pretrained", "clasifier.*")
    assert result.exit_code == 2 and result.output.startswith("error:"), result.output
    assert "classifier.1" in result.output and "┏" not in result.output  # a hint, not an empty table


@pytest.mark.parametrize("source,pattern,expected,unexpected", [
    # a wildcard pattern covers the whole name; a bare word is a substring; case is ignored
    ("timm", "resnet18", ["resnet18", "resnet18d", "seresnet18"], []),
    ("torchvision", "resnet1*", ["resnet18", "resnet101@IMAGENET1K_V2"], ["wide_resnet101_2"]),
    ("timm", "resnet1*", ["resnet18", "resnet101"], ["seresnet18", "wide_resnet101_2"]),
    ("openclip", "vit-b-32@laion2b*", ["ViT-B-32@laion2b_s34b_b79k"], ["ViT-B-32-quickgelu@metaclip_400m"]),
    ("torchvision", "ALEXNET", ["alexnet", "alexnet@IMAGENET1K_V1"], []),
])
def test_models_patterns_follow_one_rule_for_every_source(source, pattern, expected, unexpected):
    from neuropredictor.globs import match_model_names
    from neuropredictor.models import list_models

    found = [s.split(":", 1)[1] for s in list_models(source, pattern)]
    assert set(expected) <= set(found) and not set(unexpected) & set(found), found
    everything = [s.split(":", 1)[1] for s in list_models(source)]
    if source != "timm":  # timm lists tagged names only for patterns with a dot
        assert found == match_model_names(pattern, everything)


# ---------------------------------------------------------------------------------------------
# --verify, --overwrite


def _extract(corpus: Path, out: Path, *extra: str) -> Result:
    return _cli("extract", "--corpus", str(corpus), "--model", CUSTOM, "--layers", "features.5", "--out", str(out),
                "--batch-size", "2", "--num-workers", "0", "--no-prefect", *extra)


def test_inspect_verify_names_damaged_shards_and_extract_verify_repairs_them(corpus, tmp_path):
    out = tmp_path / "out.zarr"
    assert _extract(corpus, out).exit_code == 0
    clean = _cli("inspect", str(out), "--verify")
    assert clean.exit_code == 0 and "every committed shard reads back as written" in clean.output, clean.output
    chunks = sorted(p for p in (out / "features" / "features.5" / "c").rglob("*") if p.is_file())
    data = bytearray(chunks[2].read_bytes())  # chunk size = shard size: chunk 2 holds shard 2's rows
    data[len(data) // 2] ^= 0xFF
    chunks[2].write_bytes(bytes(data))
    found = _cli("inspect", str(out), "--verify")
    assert found.exit_code == 1 and "1 damaged shard(s)" in found.output and "shard-000002" in found.output
    as_json = _cli("inspect", str(out), "--verify", "--json")
    assert as_json.exit_code == 1 and list(json.loads(as_json.output)["damaged"]) == ["shard-000002"]
    repaired = _extract(corpus, out, "--verify")
    assert repaired.exit_code == 0, repaired.output
    said = " ".join(repaired.output.split())
    assert said.count("1 committed shard(s) are extracted again: shard-000002 (") == 1, said  # said once
    assert _cli("inspect", str(out), "--verify").exit_code == 0


def test_inspect_verify_names_damaged_zarr_metadata_and_extract_verify_writes_it_again(corpus, tmp_path):
    out = tmp_path / "out.zarr"
    assert _extract(corpus, out).exit_code == 0
    meta = out / "features" / "features.5" / "zarr.json"
    meta.write_text(meta.read_text()[:50])
    found = _cli("inspect", str(out), "--verify")
    said = " ".join(found.output.split())
    assert found.exit_code == 1 and "1 damaged zarr metadata file(s)" in said, said
    assert "features/features.5/zarr.json: not JSON" in said and "damaged shard" not in said
    as_json = json.loads(_cli("inspect", str(out), "--verify", "--json").output)
    assert list(as_json["damaged_metadata"]) == ["features/features.5/zarr.json"] and as_json["damaged"] == {}
    repaired = _extract(corpus, out, "--verify")
    said = " ".join(repaired.output.split())
    assert repaired.exit_code == 0 and "1 zarr metadata file(s) written again from the plan" in said, said
    assert "extracted again" not in said
    assert _cli("inspect", str(out), "--verify").exit_code == 0


def test_overwrite_says_what_it_deleted(corpus, tmp_path):
    out = tmp_path / "out.zarr"
    assert _extract(corpus, out).exit_code == 0
    (out / "notes.txt").write_text("mine")
    again = _extract(corpus, out, "--overwrite")  # the same configuration: resumed, nothing deleted
    assert again.exit_code == 0 and "replaced" not in again.output
    other = _cli("extract", "--corpus", str(corpus), "--model", CUSTOM, "--layers", "features.2", "--out", str(out),
                 "--batch-size", "2", "--num-workers", "0", "--no-prefect", "--overwrite")
    assert other.exit_code == 0, other.output
    text = " ".join(other.output.split())
    assert "--overwrite replaced a store made with another configuration (4 of 4 shards committed)" in text, text
    assert "deleted" in text and "_status" in text and "left alone: notes.txt" in text


def test_ctrl_c_during_encode_says_what_is_kept_and_how_to_resume(monkeypatch):
    import neuropredictor.encode as enc

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(enc, "encode_command", stopped)  # the command imports it when it runs
    result = _cli("encode", "f.zarr", "n.npz", "--out", "runs/s.zarr")
    assert result.exit_code == 130  # was 130 without a word
    assert "kept in runs/s.zarr.partial/; run the same command again" in " ".join(result.output.split())


def test_a_prefect_server_that_cannot_be_reached_names_the_fix(tmp_path):
    # a process of its own: Prefect reads its settings once, and this one has imported it already
    import os
    import subprocess
    import sys

    make_images(tmp_path / "imgs", 2, nested=False)
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api",  # nothing listens on the discard port
           "NEUROPREDICTOR_LOG_DIR": str(tmp_path / "logs")}
    result = subprocess.run([sys.executable, "-m", "neuropredictor", "extract", "--corpus", str(tmp_path / "imgs"),
                             "--model", "timm:resnet18", "--no-pretrained", "--layers", "layer4",
                             "--out", str(tmp_path / "o.zarr")],
                            env=env, capture_output=True, text=True, timeout=120)
    text = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Failed to reach API" in text, text  # was a bare RuntimeError
    assert "or run without Prefect (--no-prefect)" in text and "terminate called" not in text


def test_inspect_of_a_store_behind_an_endpoint_that_does_not_answer_says_what_to_check(monkeypatch):
    # was a raw "EndpointConnectionError: Could not connect to the endpoint URL" and a traceback
    for var, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "y"), ("AWS_DEFAULT_REGION", "us-east-1"),
                       ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"), ("AWS_MAX_ATTEMPTS", "1")):
        monkeypatch.setenv(var, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    result = _cli("inspect", "s3://lab/features/r.zarr")
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "cannot reach the store s3://lab/features/r.zarr" in text, text
    assert "Check the path, the endpoint" in text
    from neuropredictor.errors import StoreError
    from neuropredictor.store import open_features

    with pytest.raises(StoreError, match=r"cannot reach the store s3://lab/features/r.zarr: EndpointConnectionError"):
        open_features("s3://lab/features/r.zarr")  # a notebook's read: not a raw botocore error either
