"""The `extract` Prefect flow and the CLI that runs it: end to end on local disk and S3, retries of a
transient storage fault, a permanently failing shard, a killed run, and bad inputs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import s3fs
import zarr

from conftest import MODEL, check_against_reference, make_images
from neuropredictor_flows.artifacts import artifact_key
from neuropredictor_flows.extract import ExtractParameters, extract_flow
from neuropredictor.corpus import make_shards
from neuropredictor.errors import (ConfigMismatchError, CorpusError, LayerNotFoundError, ModelSpecError,
                                   NeuroPredictorError, StoreError)
from neuropredictor.store import FeatureStore, open_features


pytestmark = pytest.mark.usefixtures("prefect_api")

def _params(corpus, out, **kw) -> ExtractParameters:
    base = dict(corpus=str(corpus), model=MODEL, layers=["layer2", "layer4"], reduce="layer2=pool:2,layer4=avgpool",
                out=str(out), pretrained=False, batch_size=4, num_workers=1, retries=2, retry_delay_seconds=0)
    base.update(kw)
    return ExtractParameters(**base)


@pytest.fixture
def corpus(tmp_path, image_dir):
    make_shards(image_dir, str(tmp_path / "shards"), maxcount=10)  # 25 images -> 10, 10, 5
    return tmp_path / "shards"


def _arrays(url, storage_options=None) -> dict[str, np.ndarray]:
    group = zarr.open_group(FeatureStore.open(url, storage_options, mode="r").zarr_store(), mode="r")
    out = {name: np.asarray(group[f"features/{name}"][:]) for name in ("layer2", "layer4")}
    out["keys"] = np.array([str(k) for k in group["keys"][:]], dtype=object)
    out["valid"] = np.asarray(group["valid"][:])
    return out


def _assert_identical(a_url, b_url):
    a, b = _arrays(a_url), _arrays(b_url)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def test_flow_end_to_end_local_with_artifacts(corpus, image_dir, tmp_path):
    out = tmp_path / "out.zarr"
    state = extract_flow(_params(corpus, out), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["status"] == "complete" and summary["rows"]["valid"] == 25
    check_against_reference(open_features(str(out)), image_dir)
    arts = _artifacts(state.state_details.flow_run_id)
    # keys of the store's own (explorer: one key for every store showed whichever ran last in the UI)
    key = {kind: artifact_key(kind, str(out)) for kind in ("extract-progress", "extract-layers", "extract-shards",
                                                           "extract-summary")}
    assert set(key.values()) <= set(arts) and key["extract-summary"].startswith("extract-summary-out-")
    assert artifact_key("extract-summary", str(tmp_path / "elsewhere" / "out.zarr")) != key["extract-summary"]
    assert float(arts[key["extract-progress"]].data) == pytest.approx(100.0)
    layers = json.loads(arts[key["extract-layers"]].data)
    assert [row["layer"] for row in layers] == ["layer2", "layer4"] and layers[0]["shape"] == "(N, 128, 2, 2)"
    assert str(out) in arts[key["extract-summary"]].data and "open_features" in arts[key["extract-summary"]].data


def test_progress_counts_only_the_runs_own_shards(corpus, tmp_path):
    # a child run of extract-distributed extracts a group of shards: the rest of the store is not its
    # progress (its bar started at 60% here, and stayed there when its one shard failed)
    shard = corpus / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:4000])
    state = extract_flow(_params(corpus, tmp_path / "out.zarr", shards=["shard-000000"], finalize=False, retries=0),
                         return_state=True)
    assert state.is_failed()
    # a key of its group's own: children run at once, and one key for all showed whichever wrote last
    key = artifact_key("extract-progress", str(tmp_path / "out.zarr"), "shard-000000")
    assert float(_artifacts(state.state_details.flow_run_id)[key].data) == 0.0


def test_flow_end_to_end_s3(s3, image_dir):
    make_shards(image_dir, "s3://test-bucket/corpus", maxcount=10, storage_options=s3)
    # credentials come from the environment (conftest's `s3`); only the endpoint is a parameter
    params = _params("s3://test-bucket/corpus", "s3://test-bucket/runs/flow.zarr",
                     storage_options={"endpoint_url": s3["endpoint_url"]})
    summary = extract_flow(params)
    assert summary["status"] == "complete"
    check_against_reference(open_features("s3://test-bucket/runs/flow.zarr", s3), image_dir)
    manifest = FeatureStore.open("s3://test-bucket/runs/flow.zarr", s3, mode="r").manifest
    assert "testing-secret" not in json.dumps(manifest)


def test_credentials_from_a_prefect_secret_block(s3, image_dir, monkeypatch):
    from prefect.blocks.system import Secret

    make_shards(image_dir, "s3://test-bucket/corpus", maxcount=10, storage_options=s3)
    Secret(value=json.dumps(s3)).save("np-test-s3", overwrite=True)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var)  # only the block knows how to reach the store now
    s3fs.S3FileSystem.clear_instance_cache()
    params = _params("s3://test-bucket/corpus", "s3://test-bucket/runs/block.zarr", credentials_block="np-test-s3")
    state = extract_flow(params, return_state=True)
    assert state.result()["status"] == "complete"
    manifest = FeatureStore.open("s3://test-bucket/runs/block.zarr", s3, mode="r").manifest
    assert "testing-secret" not in json.dumps(manifest) and manifest["rows"]["valid"] == 25
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # what Prefect's database keeps of the run's parameters
        stored = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert stored["params"]["credentials_block"] == "np-test-s3" and "testing-secret" not in json.dumps(stored)
    # a block holding a bare key, not options: was a JSONDecodeError
    from neuropredictor_flows.extract import resolve_credentials

    Secret(value="testing-secret").save("np-test-plain", overwrite=True)
    with pytest.raises(ValueError, match="'np-test-plain' must hold the storage options as a JSON object") as err:
        resolve_credentials(None, "np-test-plain")
    assert "testing-secret" not in str(err.value)


def test_a_sweep_with_a_credentials_block_passes_the_block_to_its_extract_subflow(s3, image_dir, monkeypatch):
    """The sweep resolves the block for itself, but each model's extract subflow must get the block's name,
    not the secret: its parameters are kept in Prefect's database (and refused when they hold one)."""
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from neuropredictor_flows.sweep import SweepParameters, extract_sweep_flow

    make_shards(image_dir, "s3://test-bucket/corpus", maxcount=10, storage_options=s3)
    Secret(value=json.dumps(s3)).save("np-test-s3", overwrite=True)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var)
    s3fs.S3FileSystem.clear_instance_cache()
    params = SweepParameters(corpus="s3://test-bucket/corpus", models=[MODEL], layers=["layer4"], reduce="avgpool",
                             out="s3://test-bucket/sweep", pretrained=False, batch_size=8, num_workers=0, retries=0,
                             credentials_block="np-test-s3")
    state = extract_sweep_flow(params, return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["models"][0]["extract"]["rows"]["valid"] == 25
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
    assert len(children) == 1 and children[0].parameters["params"]["credentials_block"] == "np-test-s3"
    assert "testing-secret" not in json.dumps(children[0].parameters)


@pytest.mark.parametrize("options", [{"key": "AKIA", "secret": "s3cr3t", "endpoint_url": "http://x"},
                                     {"client_kwargs": {"aws_secret_access_key": "s3cr3t"}},
                                     {"endpoint_url": "http://user:pa55@minio:9000"},
                                     {"connection_string": "AccountName=a;AccountKey=s3cr3t;EndpointSuffix=x"}])
def test_credentials_are_never_flow_parameters(tmp_path, options):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="credentials_block") as info:
        _params(tmp_path, tmp_path / "out.zarr", storage_options=options)
    assert "s3cr3t" not in str(info.value) and "pa55" not in str(info.value)
    assert _params(tmp_path, tmp_path / "out.zarr", storage_options={"endpoint_url": "http://x"}).storage_options


class FlakyS3(s3fs.S3FileSystem):
    """S3 whose first `failures` writes of feature chunks fail, like a throttled or flaky object store."""

    protocol = ("flakys3",)
    failures = 0

    async def _pipe_file(self, path, data, *args, **kwargs):
        if "/features/" in path and "/c/" in path and FlakyS3.failures > 0:
            FlakyS3.failures -= 1
            raise OSError(f"injected transient write failure for {path}")
        return await super()._pipe_file(path, data, *args, **kwargs)


def test_transient_storage_fault_is_retried(s3, image_dir):
    fsspec.register_implementation("flakys3", FlakyS3, clobber=True)
    make_shards(image_dir, "s3://test-bucket/corpus", maxcount=10, storage_options=s3)
    FlakyS3.failures = 2  # the first shard's first two attempts each lose one chunk write
    params = _params("s3://test-bucket/corpus", "flakys3://test-bucket/runs/flaky.zarr",
                     storage_options={"endpoint_url": s3["endpoint_url"]}, retries=3)
    state = extract_flow(params, return_state=True)
    assert state.is_completed(), state.message
    assert FlakyS3.failures == 0
    manifest = FeatureStore.open("s3://test-bucket/runs/flaky.zarr", s3, mode="r").manifest
    attempts = {s["name"]: s["attempts"] for s in manifest["shards"]}
    assert attempts["shard-000000"] == 3 and attempts["shard-000002"] == 1
    check_against_reference(open_features("s3://test-bucket/runs/flaky.zarr", s3), image_dir)


def test_a_model_changed_during_a_flow_run_is_not_retried(corpus, tmp_path):
    # a checkpoint saved again mid-run is refused at the next shard; Prefect retried that task, twice, to the
    # same refusal
    import os

    import torch

    from neuropredictor.models import load_model
    from neuropredictor_flows.extract import PROGRESS

    weights = tmp_path / "ckpt.pt"
    state = load_model(MODEL, pretrained=False).module.state_dict()
    torch.save(state, weights)
    changed = []

    def on_event(event, data):
        if event == "shard" and not changed:  # after the first shard: the next epoch's checkpoint
            torch.save({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}, weights)
            os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
            changed.append(data["name"])

    out = tmp_path / "out.zarr"
    token = PROGRESS.set(on_event)
    try:
        run_state = extract_flow(_params(corpus, out, weights=str(weights), retries=2), return_state=True)
    finally:
        PROGRESS.reset(token)
    assert run_state.is_failed() and changed == ["shard-000000"]
    manifest = json.loads((out / "manifest.json").read_text())
    failed = [s for s in manifest["shards"] if s["status"] == "failed"]
    assert [s["name"] for s in failed] == ["shard-000001", "shard-000002"]
    assert all(s["attempts"] == 1 and "differs from the one the store" in s["error"] for s in failed), failed


def test_permanent_fault_fails_the_flow_then_rerun_runs_only_that_shard(corpus, tmp_path):
    clean = tmp_path / "clean.zarr"
    extract_flow(_params(corpus, clean))
    tar = corpus / "shard-000001.tar"
    original = tar.read_bytes()
    tar.write_bytes(original[: len(original) // 2])  # truncated: every attempt fails
    out = tmp_path / "out.zarr"
    state = extract_flow(_params(corpus, out, retries=1), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="shard-000001") as info:
        state.result()
    assert "run the same command again" in str(info.value)
    manifest = json.loads((out / "manifest.json").read_text())
    status = {s["name"]: s["status"] for s in manifest["shards"]}
    assert status == {"shard-000000": "committed", "shard-000001": "failed", "shard-000002": "committed"}
    failed = next(s for s in manifest["shards"] if s["name"] == "shard-000001")
    assert failed["attempts"] == 2 and "CorpusError" in failed["error"]
    kept = {p: p.stat().st_mtime_ns for p in (out / "_status").glob("shard-00000[02].json")}
    tar.write_bytes(original)  # fix the cause, run again
    summary = extract_flow(_params(corpus, out))
    assert summary["status"] == "complete"
    assert kept == {p: p.stat().st_mtime_ns for p in kept}  # the other shards did not run again
    _assert_identical(str(clean), str(out))


def test_killed_run_then_rerun_gives_the_identical_store(tmp_path, prefect_api):
    images = tmp_path / "imgs"
    make_images(images, 24, nested=False)
    corpus = tmp_path / "shards"
    make_shards(images, str(corpus), maxcount=3)  # 8 shards
    clean = tmp_path / "clean.zarr"
    extract_flow(_params(corpus, clean, batch_size=2))
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "neuropredictor", "extract", "--corpus", str(corpus), "--model", MODEL,
           "--layers", "layer2,layer4", "--reduce", "layer2=pool:2,layer4=avgpool", "--out", str(out),
           "--no-pretrained", "--batch-size", "2", "--num-workers", "1"]
    env = {**__import__("os").environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / "_status").glob("*.json"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    committed = len(list((out / "_status").glob("*.json")))
    assert 2 <= committed < 8
    summary = extract_flow(_params(corpus, out, batch_size=2))
    assert summary["status"] == "complete"
    _assert_identical(str(clean), str(out))


@pytest.mark.parametrize(
    "change,error,words",
    [
        ({"model": "torchvision:resnet19"}, ModelSpecError, "resnet18"),
        ({"layers": ["layer5"]}, LayerNotFoundError, "layer4"),
        ({"corpus": "MISSING"}, CorpusError, "does not exist"),
        ({"out": "FILE/out.zarr"}, StoreError, "is a file"),
    ],
)
def test_bad_inputs_fail_fast_and_write_nothing(corpus, tmp_path, change, error, words):
    (tmp_path / "FILE").write_text("not a folder")
    kw = {"corpus": corpus, "out": tmp_path / "never.zarr"}
    kw.update({k: (tmp_path / v if k in ("corpus", "out") else v) for k, v in change.items()})
    params = _params(**kw)
    with pytest.raises(error, match=words):
        extract_flow(params)
    assert not (tmp_path / "never.zarr").exists() and not (tmp_path / "FILE" ).is_dir()


def test_relative_outputs_and_missing_inputs_are_refused_in_a_deployed_run(corpus, tmp_path, monkeypatch):
    # explorer: a deployed run with out="rel_out.zarr" ended Completed, its store written into the worker's
    # temporary folder (or a pod's) and deleted with it
    monkeypatch.chdir(tmp_path)
    params = _params("shards", "rel_out.zarr")  # the corpus is there, as inputs shipped with the code are
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "6f1a4a4e-0000-4000-8000-000000000000")  # Prefect's own
    with pytest.raises(ValueError, match=r"relative path\(s\) in a deployed run: out='rel_out.zarr'\. This run "
                                         r"works in its worker's folder .*absolute paths on the worker's machine"):
        extract_flow(params)
    with pytest.raises(ValueError, match=r"corpus='missing', out='file://rel_out.zarr'"):
        extract_flow(params.model_copy(update={"corpus": "missing", "out": "file://rel_out.zarr"}))
    assert not (tmp_path / "rel_out.zarr").exists()
    out = str(tmp_path / "out.zarr")  # absolute: taken, with the relative input that is there
    assert extract_flow(params.model_copy(update={"out": out}))["status"] == "complete"
    monkeypatch.delenv("PREFECT__RUNTIME__DEPLOYMENT__ID")  # the command line or a notebook: the working folder
    assert extract_flow(params)["status"] == "complete" and (tmp_path / "rel_out.zarr" / "manifest.json").exists()


def test_a_url_password_quoted_by_an_error_is_redacted_in_the_flow_run(tmp_path):
    # explorer: a brace pattern's "do not exist" message carried the URL's password into the run's state and logs
    params = _params("http://alice:SuperSecret987@127.0.0.1:9/train-{000000..000003}.tar", tmp_path / "o.zarr")
    state = extract_flow(params, return_state=True)  # nothing listens on the discard port
    assert state.is_failed() and "cannot reach corpus http://alice:***@127.0.0.1:9/" in state.message
    assert "SuperSecret987" not in state.message


def test_config_mismatch_refused_through_the_flow(corpus, tmp_path):
    out = tmp_path / "out.zarr"
    extract_flow(_params(corpus, out))
    before = (out / "manifest.json").read_text()
    with pytest.raises(ConfigMismatchError, match="reductions"):
        extract_flow(_params(corpus, out, reduce="avgpool"))
    assert (out / "manifest.json").read_text() == before
    # with overwrite, the store is replaced, and the run's log in the UI says what was deleted
    state = extract_flow(_params(corpus, out, reduce="avgpool", overwrite=True), return_state=True)
    assert state.is_completed(), state.message
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # log lines reach the server in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    said = [log.message for log in logs if "replaced a store made with another configuration" in log.message]
    assert len(said) == 1 and said[0].startswith("overwrite=True") and "manifest.json" in said[0], said


def test_tasks_never_write_into_a_store_replaced_since_the_plan(corpus, tmp_path, monkeypatch):
    # a run whose lease lapsed (a laptop asleep, storage unreachable for a minute) lets another run replace
    # the store; this run's later tasks opened the replacement afresh and committed their rows into it,
    # under the other configuration's manifest
    from neuropredictor import ExtractConfig, plan, schedule

    out = tmp_path / "out.zarr"
    # the other configuration has arrays of the same shapes: only the generation tells the stores apart
    other = ExtractConfig(**_params(corpus, out, dtype="float16", overwrite=True).library_config().model_dump())
    extract_group, calls = schedule.extract_group, []

    def replaced_after_the_first(config, group, *args, **kwargs):
        calls.append(group[0].name)
        if len(calls) == 2:
            for lease in (out / "_runs").glob("*.json"):  # this run's lease, as after a minute without renewal
                lease.write_text(json.dumps(dict(json.loads(lease.read_text()), expires_at=0)))
            plan(other)
        return extract_group(config, group, *args, **kwargs)

    monkeypatch.setattr(schedule, "extract_group", replaced_after_the_first)
    state = extract_flow(_params(corpus, out, retries=0), return_state=True)
    store = FeatureStore.open(str(out))
    assert store.committed() == {} and store.manifest["config"]["dtype"] == "float16"
    assert store.manifest["status"] == "planned"  # and never finalized by this run
    assert state.is_failed() and len(calls) == 3
    with pytest.raises(Exception, match="replaced by another run"):
        state.result()


def test_cli_extract_resume_inspect(corpus, tmp_path):
    from typer.testing import CliRunner

    from neuropredictor.cli import app

    out = tmp_path / "cli.zarr"
    args = ["extract", "--corpus", str(corpus), "--model", MODEL, "--layers", "layer4", "--reduce", "avgpool",
            "--out", str(out), "--no-pretrained", "--batch-size", "8", "--num-workers", "0", "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output.strip().splitlines()[-1])
    assert summary["status"] == "complete" and summary["rows"]["committed"] == 25
    chunks = {p: p.stat().st_mtime_ns for p in (out / "features").rglob("*") if p.is_file() and p.name != "zarr.json"}
    again = CliRunner().invoke(app, args)  # the same command again: resumes, nothing left to do
    assert again.exit_code == 0, again.output
    assert chunks == {p: p.stat().st_mtime_ns for p in chunks}
    info = CliRunner().invoke(app, ["inspect", str(out), "--json"])
    data = json.loads(info.output)
    assert data["shards"] == {"total": 3, "committed": 3} and data["layers"][0]["shape"] == [512]
    bad = CliRunner().invoke(app, args[:-1] + ["--layers", "layer9"])
    assert bad.exit_code == 2 and "layer4" in bad.output


def _planted_neural(store_url: str, path: Path, layer: str = "layer4", targets: int = 12, seed: int = 0) -> None:
    """Neural data made as a known linear map of one layer's features plus noise, keys in the file."""
    ds = open_features(store_url)
    x = ds[layer].values.reshape(ds.sizes["stimulus"], -1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    rng = np.random.default_rng(seed)
    y = x @ rng.normal(size=(x.shape[1], targets)) / np.sqrt(x.shape[1])
    y += 0.3 * y.std() * rng.normal(size=y.shape)
    np.savez(path, data=y, key=np.array(list(ds["key"].values)))


@pytest.fixture(scope="module")
def encoded_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    make_images(root / "imgs", 80, nested=False)
    make_shards(root / "imgs", str(root / "shards"), maxcount=40)
    out = root / "features.zarr"
    extract_flow(_params(root / "shards", out, layers=["layer1", "layer4"], reduce="avgpool", batch_size=16))
    _planted_neural(str(out), root / "neural.npz")
    return root


def test_encode_flow_scores_layers_with_artifacts(encoded_store):
    from neuropredictor_flows.encode import EncodeParameters, encode_flow

    root = encoded_store
    params = EncodeParameters(features=str(root / "features.zarr"), neural=str(root / "neural.npz"),
                              out=str(root / "scores-flow.zarr"), alphas="logspace:-2:4:7", inner_folds=3)
    state = encode_flow(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["best_layer"] == "layer4"  # the planted layer wins
    assert summary["layers"]["layer4"] > summary["layers"]["layer1"]
    import xarray as xr

    scores = xr.open_zarr(root / "scores-flow.zarr")
    assert list(scores["layer"].values) == ["layer1", "layer4"] and scores["r"].shape == (2, 12)
    assert Path(summary["plot"]).stat().st_size > 1000
    arts = _artifacts(state.state_details.flow_run_id)
    kinds = {kind: next((a for k, a in arts.items() if k.startswith(f"{kind}-scores-flow-")), None)
             for kind in ("encode-progress", "encode-scores", "encode-summary")}
    assert None not in kinds.values(), sorted(arts)
    assert "data:image/png;base64," in kinds["encode-summary"].data


def test_encode_flow_a_failed_layer_does_not_stop_the_others_and_a_rerun_scores_only_it(encoded_store,
                                                                                        monkeypatch):
    import neuropredictor.encode.run as run_module
    from neuropredictor_flows.encode import EncodeParameters, encode_flow

    real, scored = run_module.score_layer, []

    def score_layer(prep, layer, options=None, **fields):
        if layer == "layer1" and not scored:
            raise MemoryError("cannot allocate")
        scored.append(layer)
        return real(prep, layer, options, **fields)

    monkeypatch.setattr(run_module, "score_layer", score_layer)
    root = encoded_store
    params = EncodeParameters(features=str(root / "features.zarr"), neural=str(root / "neural.npz"),
                              out=str(root / "scores-failed.zarr"), alphas="logspace:-2:4:7", inner_folds=3,
                              permutations=0, retries=0)
    state = encode_flow(params, return_state=True)
    assert state.is_failed() and scored == ["layer4"]
    assert "layer1: MemoryError: cannot allocate" in state.message and "kept" in state.message
    assert not (root / "scores-failed.zarr").exists()
    state = encode_flow(params, return_state=True)
    assert state.is_completed(), state.message
    assert scored == ["layer4", "layer1"] and state.result()["best_layer"] == "layer4"
    assert not (root / "scores-failed.zarr.partial").exists()


def test_cli_encode(encoded_store):
    from typer.testing import CliRunner

    from neuropredictor.cli import app

    root = encoded_store
    result = CliRunner().invoke(app, ["encode", str(root / "features.zarr"), str(root / "neural.npz"),
                                      "--out", str(root / "scores-cli.zarr"), "--alphas", "logspace:-2:4:7",
                                      "--inner-folds", "3", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["best_layer"] == "layer4" and summary["n_train"] + summary["n_test"] == 80
    bad = CliRunner().invoke(app, ["encode", str(root / "features.zarr"), str(root / "missing.npz"),
                                   "--out", str(root / "never.zarr")])
    assert bad.exit_code == 2 and not (root / "never.zarr").exists()
    # stimuli left out of the fit are said on the terminal, not only in the log file
    with np.load(root / "neural.npz") as z:
        np.savez(root / "half.npz", data=z["data"][:40], key=np.array([f"other/{k}" for k in z["key"][:20]]
                                                                        + list(z["key"][20:40])))
    half = CliRunner().invoke(app, ["encode", str(root / "features.zarr"), str(root / "half.npz"),
                                    "--out", str(root / "scores-half.zarr"), "--alphas", "logspace:-2:4:7",
                                    "--inner-folds", "3", "--permutations", "0"])
    assert half.exit_code == 0 and "matched 20 stimuli" in " ".join(half.output.split()), half.output


def test_encode_array_option_in_cli_and_flow(encoded_store):
    """An .npz with two 2-D arrays, neither called data/betas/...: the error points to --array, and the
    CLI's --array and the flow's `array` pick the data (issue 12, item 6: the option did not exist)."""
    import xarray as xr
    from typer.testing import CliRunner

    from neuropredictor_flows.encode import EncodeParameters, encode_flow
    from neuropredictor.cli import app

    root = encoded_store
    with np.load(root / "neural.npz") as z:
        np.savez(root / "named.npz", rates=z["data"], baseline=np.zeros_like(z["data"]), key=z["key"])
    args = ["encode", str(root / "features.zarr"), str(root / "named.npz"), "--alphas", "logspace:-2:4:7",
            "--inner-folds", "3"]
    bad = CliRunner().invoke(app, args + ["--out", str(root / "never.zarr")])
    assert bad.exit_code == 2 and "--array" in bad.output and "rates" in bad.output
    good = CliRunner().invoke(app, args + ["--out", str(root / "scores-array.zarr"), "--array", "rates", "--json"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.output.strip().splitlines()[-1])["best_layer"] == "layer4"
    params = EncodeParameters(features=str(root / "features.zarr"), neural=str(root / "named.npz"), array="rates",
                              out=str(root / "scores-array-flow.zarr"), alphas="logspace:-2:4:7", inner_folds=3)
    state = encode_flow(params, return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["best_layer"] == "layer4"
    # every layer keeps its own solver and timing in the combined result
    scores = xr.open_zarr(root / "scores-array-flow.zarr")
    assert scores["seconds"].dims == ("layer",) and (scores["seconds"].values > 0).all()
    assert scores["solver"].sizes == {"layer": 2} and set(scores["solver"].values.tolist()) <= {"ridge", "kernel"}


def test_cli_encode_table_per_roi_marks_chance(encoded_store):
    """Issue 12, item 8: the CLI table has a column per ROI, marks layers not above chance, names no best
    layer for an ROI of pure noise, and describes K-fold splits as such."""
    from typer.testing import CliRunner

    from neuropredictor.cli import app

    root = encoded_store
    with np.load(root / "neural.npz") as z:
        y, key = z["data"], z["key"]
    noise = np.random.default_rng(1).standard_normal(y.shape)
    np.savez(root / "rois.npz", data=np.hstack([y, noise]), key=key,
             roi=np.array(["V1"] * y.shape[1] + ["IT"] * y.shape[1]))
    result = CliRunner().invoke(app, ["encode", str(root / "features.zarr"), str(root / "rois.npz"), "--out",
                                      str(root / "scores-rois.zarr"), "--alphas", "logspace:-2:4:7",
                                      "--inner-folds", "3", "--folds", "4"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "layer" in line and "V1" in line)
    assert "all" in header and "IT" in header
    assert "best layer, V1: layer4" in result.output and "best layer, IT: none above chance" in result.output
    text = " ".join(result.output.split())  # the table's title wraps to the table's width
    assert "n.s." in text and "4-fold CV, 80 stimuli" in text, result.output


def test_decode_workers_survive_a_finished_flow_run(corpus, tmp_path):
    """After a flow has run in a process, Prefect's services leave thread-exit hooks that broke forked
    DataLoader workers (exit code 1): a notebook's second extraction must still decode in workers."""
    from neuropredictor.corpus import list_shards, read_shard
    from neuropredictor.models import load_model

    extract_flow(_params(corpus, tmp_path / "first.zarr", num_workers=0))
    shard = list_shards(str(corpus))[0]
    batches = list(read_shard(shard, load_model(MODEL, pretrained=False).transform, 4, num_workers=2))
    assert sum(len(b) for b in batches) == shard.count == 10


def test_an_interrupted_shard_task_ends_cancelled_in_the_ui(corpus, tmp_path):
    # Ctrl-C (STOP) ends the running shard task after its batch: the UI must not show it Completed, since
    # its shard was not committed (and it must not be retried, since nothing failed)
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from neuropredictor_flows.extract import PROGRESS, STOP

    stop = threading.Event()
    tokens = PROGRESS.set(lambda event, data: stop.set() if event == "batch" else None), STOP.set(stop)
    try:
        state = extract_flow(_params(corpus, tmp_path / "out.zarr"), return_state=True)
    finally:
        PROGRESS.reset(tokens[0])
        STOP.reset(tokens[1])
    assert state.is_cancelled()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    shard_runs = [r for r in runs if r.task_key.startswith("extract_shards")]
    assert shard_runs and all(r.state.is_cancelled() for r in shard_runs), [(r.name, r.state.type) for r in shard_runs]
    assert all(r.run_count == 1 for r in shard_runs)
    assert not list((tmp_path / "out.zarr" / "_status").glob("*.json"))  # nothing committed


def test_artifacts_stay_small_at_any_scale(tmp_path):
    # a table row per shard (2 MiB at 10,000 shards) and a comparison plot of 300 models (8 MiB, base64) went
    # into artifacts whole: Prefect Cloud refuses request bodies over 5 MiB, failing a run whose work was done
    from neuropredictor_flows.artifacts import MAX_IMAGE_BYTES, MAX_ROWS, markdown_image, shard_rows

    shards = [{"name": f"s{i:05d}", "status": "committed", "images_per_s": float(1000 + i)} for i in range(MAX_ROWS + 100)]
    shards[550]["status"], shards[550]["images_per_s"] = "failed", None
    rows, what = shard_rows(shards)
    assert len(rows) == MAX_ROWS and rows[0]["name"] == "s00550" and rows[1]["name"] == "s00000"
    assert what.startswith(f"{MAX_ROWS} of {MAX_ROWS + 100} shards: failed and pending first, then the slowest")
    assert shard_rows(shards[:10]) == (shards[:10], "Per-shard status and throughput")
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    small.write_bytes(b"\x89PNG" + bytes(100))
    big.write_bytes(b"\x89PNG" + bytes(MAX_IMAGE_BYTES))
    assert markdown_image(str(small), "plot").startswith("![plot](data:image/png;base64,iVBORw")
    assert markdown_image(str(big), "plot") == f"*The plot is over 1 MiB, too big to show here: open `{big}`.*\n"


def test_the_distributed_parent_launches_in_waves_and_gives_up_on_a_broken_deployment():
    # every child was launched at once: on a cluster with fewer GPUs, pods waited pending until the worker
    # called them Crashed and they were relaunched (while still starting later); a deployment failing every
    # child was relaunched for every group; a cancelled child came back
    from uuid import uuid4

    from neuropredictor_flows.distributed import Launches

    window = Launches(groups=6, max_in_flight=2, max_relaunches=1)
    first = window.to_launch()
    for i in first:
        window.running[i] = uuid4()
    assert first == [0, 1] and window.to_launch() == []
    assert window.ended(0, "CRASHED", "pod pending too long", committed=True) is False  # its shards are there
    assert window.ended(1, "CANCELLED", "by the user", committed=False) is False
    assert window.failed == {1: "CANCELLED: by the user (cancelled: not launched again)"}
    assert window.to_launch() == [2, 3]
    # a broken deployment: the first children all fail, none completes -> nothing more once none runs
    window = Launches(groups=10, max_in_flight=3, max_relaunches=2)
    for _ in range(2):
        for i in window.to_launch():
            window.running[i] = uuid4()
        for i in list(window.running):
            assert window.ended(i, "FAILED", "CUDA out of memory", committed=False) is True  # launched again
    assert window.to_launch() == [] and not window.running and window.finished == 10
    assert [window.failed[i] for i in range(3)] == ["FAILED: CUDA out of memory"] * 3
    assert all(window.failed[i].startswith("not started: the first 3 child runs all failed") for i in range(3, 10))
    # a sweep's children are models, each failing or not on its own: three broken models stop nothing
    window = Launches(groups=5, max_in_flight=3, max_relaunches=0, give_up=False)
    for i in window.to_launch():
        window.running[i] = uuid4()
        assert window.ended(i, "FAILED", "no such layer", committed=False) is False
    assert window.to_launch() == [3, 4]


def test_a_mistyped_deployment_is_named_before_any_work(corpus, tmp_path):
    """The distributed parent checks the children's deployment before loading the model or planning the
    store, and names the deployments there are."""
    from prefect import flow as prefect_flow
    from prefect.client.orchestration import get_client

    from neuropredictor_flows.distributed import DistributedParameters, check_deployment, extract_distributed_flow

    @prefect_flow(name="extract")
    def extract():  # a stand-in flow, for the name of its deployment only
        pass

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(extract)
        deployment_id = client.create_deployment(flow_id=flow_id, name="gpu-pool")
        check_deployment(client, "extract/gpu-pool")  # there: nothing raised
        check_deployment(client, str(deployment_id))  # by id, as run_deployment takes it
        with pytest.raises(NeuroPredictorError, match=r"no deployment 'extract/gpu-pol'.*did you mean extract/gpu-pool"):
            check_deployment(client, "extract/gpu-pol")
        with pytest.raises(NeuroPredictorError, match=r"no deployment 'gpu-pool'.*FLOW/DEPLOYMENT.*extract/gpu-pool"):
            check_deployment(client, "gpu-pool")
    out = tmp_path / "dist.zarr"
    params = DistributedParameters(**_params(corpus, out).model_dump(), deployment="extract/gpu_pool")
    state = extract_distributed_flow(params, return_state=True)
    assert state.is_failed() and "did you mean extract/gpu-pool" in state.message
    assert not out.exists()  # refused before the plan


def test_a_server_refuses_credentials_in_run_parameters_and_takes_layers_as_text():
    """The flows' parameter schema refuses credential-like storage option names, so a Prefect server
    (deployments enforce their schema) answers 409 instead of keeping the secret with the run."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.utilities.callables import parameter_schema

    from neuropredictor_flows.distributed import extract_distributed_flow
    from neuropredictor_flows.sweep import extract_sweep_flow

    for flow_fn in (extract_distributed_flow, extract_sweep_flow):
        definitions = parameter_schema(flow_fn).model_dump_for_openapi()["definitions"]
        assert any("propertyNames" in d.get("properties", {}).get("storage_options", {}) for d in definitions.values())
    schema = parameter_schema(extract_flow).model_dump_for_openapi()
    base = {"corpus": "s3://bucket/shards", "model": "timm:resnet18", "layers": ["layer4"], "out": "s3://bucket/o"}
    with get_client(sync_client=True) as client:
        deployment = client.create_deployment(flow_id=client.create_flow(extract_flow), name="schema-check",
                                              parameter_openapi_schema=schema, enforce_parameter_schema=True)
        # nested too: s3fs takes keys in client_kwargs (was stored, and shown in the UI, until the run started)
        for options in ({"key": "AKIAEXAMPLE"}, {"aws_secret_access_key": "x"}, {"Token": "x"},
                        {"client_kwargs": {"aws_secret_access_key": "AKIAEXAMPLE"}},
                        {"config_kwargs": {"s3": {"session_token": "AKIAEXAMPLE"}}}):
            with pytest.raises(httpx.HTTPStatusError, match="409|storage_options"):
                client.create_flow_run_from_deployment(deployment, parameters={"params": {**base,
                                                                                          "storage_options": options}})
        client.create_flow_run_from_deployment(deployment, parameters={"params": {
            **base, "storage_options": {"endpoint_url": "http://127.0.0.1:9000",
                                        "client_kwargs": {"region_name": "eu-west-1"}}}})
        # layers as "a,b", as the command line and the library take them (the schema said array only)
        client.create_flow_run_from_deployment(deployment, parameters={"params": {**base, "layers": "layer3,layer4"}})
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment])))
        assert len(runs) == 2 and "AKIA" not in json.dumps([r.parameters for r in runs], default=str)
