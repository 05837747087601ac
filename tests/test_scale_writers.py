"""Many writers, one store on S3 (moto's server): processes extracting disjoint groups of shards at once,
with chunks shared between their groups, give the store a single process gives, bit for bit; two
instances given the same shards at once (a relaunched child whose first instance still runs) leave a
correct store and one commit record per shard. The children call the library as `extract-distributed`'s
children do: open the planned store, `schedule.extract_group` on their group; the parent finalizes once."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neuropredictor import ExtractConfig, run
from neuropredictor.pipeline import plan
from neuropredictor.schedule import finalize
from neuropredictor.store import FeatureStore

CUSTOM = f"custom:{Path(__file__).parent / 'custom_models.py'}:cifar_cnn"
# Unequal shards: chunks of the median size (5 rows) straddle shard and group boundaries.
COUNTS = [5, 7, 3, 6, 4, 8, 5, 2, 7, 6, 3, 5, 9, 4, 6, 5]
BAD = {("shard-03", 2)}  # an undecodable sample: its row is invalid, and named in the manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("scale_corpus")
    rng = np.random.default_rng(7)
    urls = []
    for j, n in enumerate(COUNTS):
        path = root / f"shard-{j:02d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, format="png")
                data = b"not an image" if (f"shard-{j:02d}", i) in BAD else buf.getvalue()
                info = tarfile.TarInfo(f"s{j:02d}_{i:02d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def _config(corpus: list[str], out: str, opts: dict) -> ExtractConfig:
    return ExtractConfig(corpus=corpus, model=CUSTOM, layers=["features.5"], reduce="full", out=out,
                         batch_size=2, num_workers=0, retries=0, retry_delay_seconds=0, storage_options=opts,
                         device="cpu")


_CHILD = textwrap.dedent("""
    import json, sys
    from neuropredictor import ExtractConfig, schedule
    from neuropredictor.pipeline import validate
    from neuropredictor.store import FeatureStore
    cfg = ExtractConfig.model_validate_json(sys.argv[1])
    store = FeatureStore.open(cfg.out, cfg.storage_options)
    for group in schedule.pending_groups(store, validate(cfg), json.loads(sys.argv[2]), per_group=100):
        records = schedule.extract_group(cfg, group, store)
    print(json.dumps({"done": True}))
    """)


def _children(cfg: ExtractConfig, groups: list[list[str]], cwd: Path) -> None:
    """One process per group, all at once; each must end without error."""
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, cfg.model_dump_json(), json.dumps(g)], cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for g in groups]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        assert '"done": true' in out, err[-3000:]


def _arrays(url: str, opts: dict) -> dict[str, np.ndarray]:
    store = FeatureStore.open(url, opts, mode="r")
    out = {path: store.array(path)[:] for path in store.chunk_rows}
    out["keys"] = np.asarray(out["keys"].tolist(), dtype=str)
    return out


def _assert_identical(a_url: str, b_url: str, opts: dict) -> None:
    a, b = _arrays(a_url, opts), _arrays(b_url, opts)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _commit_records(url: str, opts: dict) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    return sorted(p.rsplit("/", 1)[1] for p in fs.ls(url + "/_status", detail=False)
                  if not p.endswith(".failed.json"))


@pytest.fixture
def reference(corpus, s3) -> str:
    url = "s3://test-bucket/single.zarr"
    manifest = run(_config(corpus, url, s3))
    assert manifest["status"] == "complete" and manifest["rows"]["valid"] == sum(COUNTS) - len(BAD)
    return url


def _names() -> list[str]:
    return [f"shard-{j:02d}" for j in range(len(COUNTS))]


def test_eight_processes_writing_disjoint_groups_give_the_single_process_store(corpus, s3, reference, tmp_path):
    url = "s3://test-bucket/many.zarr"
    cfg = _config(corpus, url, s3)
    store = plan(cfg)
    rows = store.chunk_rows["features/features.5"]
    names = _names()
    groups = [names[i:i + 2] for i in range(0, len(names), 2)]
    # the groups' edges fall inside chunks: those chunks get rows from two processes
    edges = [s.offset for s in store.shards if s.name in {g[0] for g in groups[1:]}]
    assert sum(e % rows != 0 for e in edges) >= 4
    _children(cfg, groups, tmp_path)
    manifest = finalize(cfg)
    assert manifest["status"] == "complete" and manifest["rows"]["valid"] == sum(COUNTS) - len(BAD)
    assert [(b["shard"], b["key"]) for b in manifest["bad_samples"]] == [("shard-03", "s03_02")]
    _assert_identical(reference, url, s3)
    assert _commit_records(url, s3) == [f"{n}.json" for n in names]
    assert FeatureStore.open(url, s3).verify() == {}


def test_two_instances_given_the_same_shards_at_once_leave_a_correct_store(corpus, s3, reference, tmp_path):
    url = "s3://test-bucket/twice.zarr"
    cfg = _config(corpus, url, s3)
    plan(cfg)
    names = _names()
    # the first instance of a child, and its relaunch while it still runs, with four more groups beside them
    _children(cfg, [names[:8], names[:8], names[8:12], names[12:]], tmp_path)
    manifest = finalize(cfg)
    assert manifest["status"] == "complete" and manifest["rows"]["valid"] == sum(COUNTS) - len(BAD)
    _assert_identical(reference, url, s3)
    assert _commit_records(url, s3) == [f"{n}.json" for n in names]
    assert FeatureStore.open(url, s3).verify() == {}


def test_a_second_attempt_at_a_shard_leaves_the_first_attempts_staged_rows_alone(s3):
    """The race above, step by step: the relaunch opens its writer while the first instance has staged its
    boundary rows but not committed yet; both then commit (in either order) and finalize merges one of them."""
    from test_store import (
        LAYERS,
        UNEQUAL,
        Target,
        create,
        expected_arrays,
        expected_row,
        make_shards,
        read_arrays,
        write_rows,
    )

    target = Target("s3://test-bucket/race.zarr", s3)
    store = create(target)
    shards = make_shards(UNEQUAL)
    shard = shards[1]  # a middle shard: boundary chunks on both sides
    first = write_rows(store, shard)
    first.close()
    again = FeatureStore.open(target.url, s3).writer(shard)  # the relaunch starts, the first one still alive
    first.commit({})  # its staged rows are still there
    rows = [expected_row(r) for r in range(shard.offset, shard.end)]
    again.write(0, [r[0] for r in rows], np.array([r[1] for r in rows]),
                {lay.name: np.stack([r[2][lay.name] for r in rows]) for lay in LAYERS})
    again.commit({})
    for s in (shards[0], shards[2]):
        w = write_rows(store, s)
        w.commit({})
    manifest = store.finalize()
    assert manifest["status"] == "complete"
    got = read_arrays(target.url, s3)
    for k, want in expected_arrays(sum(UNEQUAL)).items():
        np.testing.assert_array_equal(got[k], want, err_msg=k)
    assert store.verify() == {}
    assert not target.objects("_staging")  # the losing attempt's rows are cleaned up too
    assert _commit_records(target.url, s3) == [f"{s.name}.json" for s in shards]
