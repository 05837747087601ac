"""End to end through a real Prefect server: `prefect server start` (SQLite) on 127.0.0.1, work pools,
`prefect deploy --all` with deployments/prefect.yaml, two process workers for the extraction (plus one
for the parent flow's queue), a run triggered through the REST API with httpx, the store on moto S3.
Everything started here is stopped at the end, also on failure."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import s3fs

from conftest import MODEL, check_against_reference
from sweep_data import assert_identical_stores
from neuropredictor.corpus import make_shards
from neuropredictor.store import FeatureStore, locks, open_features
from neuropredictor_flows.artifacts import artifact_key
from neuropredictor_flows.distributed import PARENT_LEASE

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Background processes in their own process groups, all stopped (TERM, then KILL) at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name} ---\n" + p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob("*.log")))


@pytest.fixture
def prefect_server(tmp_path, s3_server):
    """A real Prefect server and its environment for CLI calls and workers."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # workers get S3 credentials from their environment, never from flow parameters
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ENDPOINT_URL_S3": s3_server,
    }
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    (tmp_path / "logs").mkdir()
    procs = Processes(tmp_path / "logs")
    try:
        procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("prefect server did not start in 180 s\n" + procs.tail())
        yield api, env, procs
    finally:
        procs.stop()


def _cli(env: dict, *args: str, timeout: float = 180) -> str:
    result = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _wait_run(client: httpx.Client, run_id: str, procs: Processes, timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"/flow_runs/{run_id}")
        if response.status_code == 503:  # busy, as above: ask again at the next poll
            time.sleep(1)
            continue
        run = response.raise_for_status().json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    pytest.fail(f"flow run {run_id} not finished after {timeout} s\n" + procs.tail())


def _wait_idle(worker: subprocess.Popen, procs: Processes, timeout: float = 60) -> None:
    """Wait until a worker has no flow run process left (Linux: its children, from /proc)."""
    children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
    deadline = time.monotonic() + timeout
    while children.read_text().strip():
        if time.monotonic() > deadline:
            pytest.fail(f"the worker still runs a flow after {timeout} s\n" + procs.tail())
        time.sleep(0.5)


def _trigger(client: httpx.Client, deployment_id: str, params: dict) -> str:
    # a loaded SQLite server answers 503 while its database is busy: a client tries again, a few times
    for _ in range(5):
        response = client.post(f"/deployments/{deployment_id}/create_flow_run", json={"parameters": {"params": params}})
        if response.status_code != 503:
            break
        time.sleep(3)
    response.raise_for_status()
    return response.json()["id"]


def test_two_workers_through_a_real_server(prefect_server, s3, image_dir):
    api, env, procs = prefect_server
    # the corpus on S3: 25 images in shards of 3 -> 9 shards, 5 child runs of 2 shards. One shard is
    # truncated at first, so its group's child run fails; it is repaired once that run has failed, and
    # the parent's relaunch of the group must then succeed.
    make_shards(image_dir, "s3://test-bucket/corpus", maxcount=3, storage_options=s3)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3)
    broken = "test-bucket/corpus/shard-000004.tar"
    good = fs.cat_file(broken)
    fs.pipe_file(broken, good[: len(good) // 2])

    _cli(env, "work-pool", "create", "local-process", "--type", "process")
    _cli(env, "work-pool", "create", "gpu-k8s", "--type", "kubernetes",
         "--base-job-template", str(REPO / "infra" / "k8s" / "base-job-template.json"))
    out = _cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    assert "extract/local" in out and "extract-distributed/distributed" in out, out
    workers: dict[str, subprocess.Popen] = {}

    for name, queue in (("w1", "default"), ("w2", "default"), ("control", "control")):
        workers[name] = procs.start(f"worker-{name}", [PREFECT, "worker", "start", "--pool", "local-process", "--work-queue", queue,
                                       "--limit", "1", "--name", name],
                    {**env, "NEUROPREDICTOR_WORKER_ID": name})

    params = {
        "corpus": "s3://test-bucket/corpus", "model": MODEL, "layers": ["layer2", "layer4"],
        "reduce": "layer2=pool:2,layer4=avgpool", "out": "s3://test-bucket/runs/e2e.zarr", "pretrained": False,
        "batch_size": 4, "num_workers": 0, "retries": 1, "retry_delay_seconds": 0,
        "deployment": "extract/local", "shards_per_child": 2, "poll_seconds": 2, "max_relaunches": 1,
    }
    failed_filter = {"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}, "name": {"like_": "shard-000004"}}}
    with httpx.Client(base_url=api, timeout=30) as client:
        deployment = client.get("/deployments/name/extract-distributed/distributed").raise_for_status().json()
        assert not deployment["pull_steps"]  # not the deploying shell's folder: workers run elsewhere
        run_id = _trigger(client, deployment["id"], params)
        deadline = time.monotonic() + 300
        while not client.post("/flow_runs/count", json=failed_filter).json():
            assert time.monotonic() < deadline, "the broken group's child run never failed\n" + procs.tail()
            time.sleep(0.25)
        # the parent holds a lease on the store while its children are queued and relaunched (none may
        # hold one then): another configuration's overwrite is refused meanwhile
        assert PARENT_LEASE in [lease["what"] for lease in locks.live(fs, "test-bucket/runs/e2e.zarr/_runs")]
        fs.pipe_file(broken, good)  # repaired: the relaunched child run reads it seconds later
        run = _wait_run(client, run_id, procs)
        assert run["state"]["type"] == "COMPLETED", json.dumps(run["state"]) + procs.tail()
        assert client.post("/flow_runs/count", json=failed_filter).json() == 1  # failed once, relaunched, done

        check_against_reference(open_features("s3://test-bucket/runs/e2e.zarr", s3), image_dir)
        manifest = FeatureStore.open("s3://test-bucket/runs/e2e.zarr", s3, mode="r").manifest
        assert manifest["status"] == "complete"
        assert {s["worker"] for s in manifest["shards"]} == {"w1", "w2"}  # both extraction workers took groups
        committed_at = {s["name"]: s["committed_at"] for s in manifest["shards"]}
        children = client.post("/flow_runs/count", json={"flow_runs": {"parent_task_run_id": {"is_null_": False}}}).json()
        assert children >= 5

        # the same run triggered again, from the CLI this time, resumes: no child run, nothing rewritten
        text = _cli(env, "deployment", "run", "extract-distributed/distributed", "-p", f"params={json.dumps(params)}")
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", text).group(1)
        again = _wait_run(client, run_id, procs)
        assert again["state"]["type"] == "COMPLETED", json.dumps(again["state"])
        manifest = FeatureStore.open("s3://test-bucket/runs/e2e.zarr", s3, mode="r").manifest
        assert {s["name"]: s["committed_at"] for s in manifest["shards"]} == committed_at
        assert client.post("/flow_runs/count", json={"flow_runs": {"parent_task_run_id": {"is_null_": False}}}).json() == children

        # a parent that failed (no relaunches left), retried as a whole (`prefect flow-run retry`, the UI's
        # Retry): the retried run keeps its id, and must launch new children for what is not committed
        fs.pipe_file(broken, good[: len(good) // 2])
        retry_params = {**params, "out": "s3://test-bucket/runs/retried.zarr", "max_relaunches": 0}
        run_id = _trigger(client, deployment["id"], retry_params)
        failed = _wait_run(client, run_id, procs)
        assert failed["state"]["type"] == "FAILED", json.dumps(failed["state"])
        _wait_idle(workers["control"], procs)  # else its worker may still judge the old process's exit
        fs.pipe_file(broken, good)
        _cli(env, "flow-run", "retry", run_id)
        retried = _wait_run(client, run_id, procs)
        assert retried["state"]["type"] == "COMPLETED", json.dumps(retried["state"]) + procs.tail()
        assert retried["run_count"] == 2
        assert FeatureStore.open("s3://test-bucket/runs/retried.zarr", s3, mode="r").manifest["status"] == "complete"
        check_against_reference(open_features("s3://test-bucket/runs/retried.zarr", s3), image_dir)


def test_sweep_through_a_real_server(prefect_server, tmp_path):
    """The extract-sweep deployment, triggered through the REST API, run by a process worker: each model's
    store, the comparison on the neural data, and the artifacts in the server."""
    import numpy as np

    from conftest import make_images

    api, env, procs = prefect_server
    make_images(tmp_path / "imgs", 40, nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=20)
    rng = np.random.default_rng(0)
    keys = [p.stem for p in sorted((tmp_path / "imgs").iterdir())]
    np.savez(tmp_path / "neural.npz", data=rng.normal(size=(40, 6)), key=np.array(keys))
    custom = f"custom:{REPO / 'tests' / 'custom_models.py'}:cifar_cnn"
    _cli(env, "work-pool", "create", "local-process", "--type", "process")
    _cli(env, "work-pool", "create", "gpu-k8s", "--type", "kubernetes",
         "--base-job-template", str(REPO / "infra" / "k8s" / "base-job-template.json"))
    _cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    # two slots: a sweep parent with `deployment` set waits while its children run
    procs.start("worker", [PREFECT, "worker", "start", "--pool", "local-process", "--limit", "2"], env)
    params = {"corpus": str(tmp_path / "shards"), "models": [custom, MODEL], "out": str(tmp_path / "sweep"),
              "pretrained": False, "batch_size": 8, "num_workers": 0, "neural": str(tmp_path / "neural.npz"),
              "encode": {"alphas": "logspace:-2:4:7", "inner_folds": 3, "permutations": 100}}
    with httpx.Client(base_url=api, timeout=30) as client:
        deployment = client.get("/deployments/name/extract-sweep/sweep").raise_for_status().json()
        run = _wait_run(client, _trigger(client, deployment["id"], params), procs)
        assert run["state"]["type"] == "COMPLETED", json.dumps(run["state"]) + procs.tail()
        artifacts = client.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
        keys_found = {a["key"] for a in artifacts}
        kinds = ("sweep-models", "sweep-ranking", "sweep-comparison", "sweep-progress")
        assert {artifact_key(kind, str(tmp_path / "sweep")) for kind in kinds} <= keys_found, keys_found
        progress = artifact_key("sweep-progress", str(tmp_path / "sweep"))
        assert next(float(a["data"]) for a in artifacts if a["key"] == progress) == 100.0
        children = client.post("/flow_runs/filter", json={"flow_runs": {"parent_task_run_id": {"is_null_": False}}}).json()
        assert len([c for c in children if c["flow_id"] != run["flow_id"]]) == 2  # one extract run per model
    for spec in (custom, MODEL):
        manifest = FeatureStore.open(str(tmp_path / "sweep" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', spec)}.zarr"),
                                     mode="r").manifest
        assert manifest["status"] == "complete" and manifest["rows"]["valid"] == 40
    table = (tmp_path / "sweep" / "comparison.csv").read_text().splitlines()
    assert len(table) > 4 and (tmp_path / "sweep" / "comparison.png").stat().st_size > 5000
    # the same sweep with each model a child run of the extract deployment: the same stores and comparison
    with httpx.Client(base_url=api, timeout=30) as client:
        children_params = {**params, "out": str(tmp_path / "fanned"), "deployment": "extract/local", "poll_seconds": 1}
        run = _wait_run(client, _trigger(client, deployment["id"], children_params), procs)
        assert run["state"]["type"] == "COMPLETED", json.dumps(run["state"]) + procs.tail()
        artifacts = client.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
        progress = artifact_key("sweep-progress", str(tmp_path / "fanned"))
        assert next(float(a["data"]) for a in artifacts if a["key"] == progress) == 100.0
    for spec in (custom, MODEL):
        name = f"{re.sub(r'[^A-Za-z0-9._-]', '_', spec)}.zarr"
        assert_identical_stores(str(tmp_path / "sweep" / name), str(tmp_path / "fanned" / name))
    assert (tmp_path / "fanned" / "comparison.csv").read_text().splitlines() == table


def test_a_run_cancelled_from_prefect_stops_its_shard_after_the_batch(prefect_server, tmp_path):
    """Cancelled from the UI or the API (the worker signals the run's process): the shard under way ends after
    its batch, uncommitted and not failed, and the process exits at once. It used to go on to the end of the
    shard (then committed it), or until the worker killed it after its grace period."""
    from conftest import make_images

    api, env, procs = prefect_server
    make_images(tmp_path / "imgs", 200, nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=200)  # one shard of 100 batches: 20 s
    out = tmp_path / "out.zarr"
    _cli(env, "work-pool", "create", "local-process", "--type", "process")
    _cli(env, "work-pool", "create", "gpu-k8s", "--type", "kubernetes",
         "--base-job-template", str(REPO / "infra" / "k8s" / "base-job-template.json"))
    _cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    worker = procs.start("worker", [PREFECT, "worker", "start", "--pool", "local-process", "--work-queue", "default",
                                    "--limit", "1"], env)
    params = {"corpus": str(tmp_path / "shards"), "model": f"custom:{REPO / 'tests' / 'custom_models.py'}:slow_cnn",
              "layers": ["features.5"], "out": str(out), "pretrained": False, "batch_size": 2, "num_workers": 1,
              "retries": 2}
    with httpx.Client(base_url=api, timeout=30) as client:
        deployment = client.get("/deployments/name/extract/local").raise_for_status().json()
        run_id = _trigger(client, deployment["id"], params)
        deadline = time.monotonic() + 240
        while not _extracting(out):  # the shard claimed
            assert time.monotonic() < deadline, "the shard never started\n" + procs.tail()
            time.sleep(0.25)
        time.sleep(3)  # a few batches in
        client.post(f"/flow_runs/{run_id}/set_state",
                    json={"state": {"type": "CANCELLING"}, "force": True}).raise_for_status()
        cancelled_at = time.monotonic()
        run = _wait_run(client, run_id, procs)
        _wait_idle(worker, procs)
        took = time.monotonic() - cancelled_at
    assert run["state"]["type"] == "CANCELLED", json.dumps(run["state"]) + procs.tail()
    assert not list((out / "_status").glob("*.json")), procs.tail()  # neither committed nor recorded as failed
    assert took < 10, f"{took:.1f} s from the cancel to the process's exit\n" + procs.tail()
    manifest = FeatureStore.open(str(out)).manifest
    assert manifest["status"] != "complete" and not FeatureStore.open(str(out)).extracting()


def _extracting(out: Path) -> list[dict]:
    try:
        return FeatureStore.open(str(out), mode="r").extracting()
    except Exception:  # not planned yet
        return []


def test_a_flow_run_whose_process_died_is_marked_crashed(prefect_server, tmp_path):
    # explorer: a flow run killed with its worker stayed Running for ever, holding the queue's concurrency slot
    # (and an extract-distributed parent would wait for it until its timeout); deployments/automations.yaml marks
    # a run without heartbeats Crashed. Created here as the README says, then again with a shorter wait
    import yaml

    api, env, procs = prefect_server
    shipped = REPO / "deployments" / "automations.yaml"
    _cli(env, "automation", "create", "--from-file", str(shipped))
    fast = yaml.safe_load(shipped.read_text())
    fast["automations"][0] |= {"name": "fast"}
    fast["automations"][0]["trigger"]["within"] = 40  # heartbeats every 30 s here (Prefect's least)
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(fast))
    _cli(env, "automation", "create", "--from-file", str(tmp_path / "fast.yaml"))
    # a stand-in named as the product's flow is, and another team's flow (the automation watches ours only)
    killed, runs = [], {}
    for name in ("extract", "someone-elses"):
        script = (f"import time\nfrom prefect import flow\n\n@flow(name={name!r})\ndef doomed():\n"
                  "    time.sleep(600)\n\ndoomed()\n")
        fast_beats = {**env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
        killed.append(procs.start(name, [sys.executable, "-c", script], fast_beats))
    with httpx.Client(base_url=api, timeout=30) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(runs) < 2:
            time.sleep(1)
            for name in ("extract", "someone-elses"):
                response = client.post("/flow_runs/filter", json={"flows": {"name": {"any_": [name]}}})
                found = response.json() if response.status_code == 200 else []
                if found and found[0]["state"]["type"] == "RUNNING":
                    runs[name] = found[0]["id"]
        assert len(runs) == 2, procs.tail()
        time.sleep(5)  # their first heartbeats go out as they start
        for proc in killed:
            os.killpg(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        run = _wait_run(client, runs["extract"], procs, timeout=240)
        # the other's last heartbeat may have gone out up to a beat later: past its own deadline, still Running
        time.sleep(max(0.0, killed_at + 40 + 30 + 15 - time.monotonic()))
        other = client.get(f"/flow_runs/{runs['someone-elses']}").raise_for_status().json()
    assert other["state"]["type"] == "RUNNING", other["state"]  # not ours: left as it is
    assert run["state"]["type"] == "CRASHED" and "No heartbeat" in run["state"]["message"], run["state"]
