"""FeatureStore: Zarr layout, concurrent shard writers, commit records, resume/overwrite, manifest.

Everything runs twice: on local disk and on S3 (moto's real server, see conftest). No mocks.
"""

from __future__ import annotations

import json
import os
import multiprocessing
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr

from neuropredictor import manifest as mf
from neuropredictor.errors import ConfigMismatchError, StoreError
from neuropredictor.shard import Shard
from neuropredictor.store import FeatureStore, LayerSpec, open_features, plan_chunk_rows

LAYERS = [LayerSpec("layer4.0.conv1", (3, 2), "avgpool"), LayerSpec("blocks.11", (4,), "cls")]
CONFIG = {"model": "timm:resnet50", "layers": ["layer4.0.conv1", "blocks.11"], "batch_size": 4,
          "precision": "bf16"}
UNEQUAL = [7, 13, 5]


# ---------------------------------------------------------------------------------------------
# helpers


def make_shards(counts: list[int]) -> list[Shard]:
    offsets = np.cumsum([0, *counts[:-1]]).tolist()
    return [Shard(url=f"s3://corpus/shard-{i:03d}.tar", name=f"shard-{i:03d}", count=c, offset=o)
            for i, (c, o) in enumerate(zip(counts, offsets))]


def expected_row(row: int) -> tuple[str, bool, dict[str, np.ndarray]]:
    valid = row % 5 != 3
    feats = {}
    for lay in LAYERS:
        x = (row + np.arange(int(np.prod(lay.shape)), dtype=np.float32).reshape(lay.shape) / 8).astype(np.float32)
        feats[lay.name] = x if valid else np.full(lay.shape, np.nan, np.float32)
    return f"img{row:05d}", valid, feats


def expected_arrays(total: int, dtype: str = "float32") -> dict[str, np.ndarray]:
    rows = [expected_row(r) for r in range(total)]
    out = {f"features/{lay.name}": np.stack([r[2][lay.name] for r in rows]).astype(dtype) for lay in LAYERS}
    out["keys"] = np.array([r[0] for r in rows])
    out["valid"] = np.array([r[1] for r in rows])
    return out


def write_rows(store: FeatureStore, shard, batch: int = 3, garbage: bool = False, stop: int | None = None):
    """Write a shard's expected rows in batches (valid rows carry features; invalid rows carry junk); returns
    the writer, neither closed nor committed."""
    w = store.writer(shard)
    end = shard.count if stop is None else stop
    for i in range(0, end, batch):
        rows = range(shard.offset + i, shard.offset + min(i + batch, end))
        keys, valid, feats = [], [], {lay.name: [] for lay in LAYERS}
        for r in rows:
            k, v, f = expected_row(r)
            keys.append(k)
            valid.append(v)
            for name, x in f.items():
                # junk in invalid rows: the writer must store NaN there whatever it was given
                feats[name].append((x if v else np.full_like(x, 7.0)) + (1000 if garbage else 0))
        w.write(i, keys, np.array(valid), {n: np.stack(x) for n, x in feats.items()})
    return w


def write_shard(store: FeatureStore, shard, batch: int = 3, garbage: bool = False, stop: int | None = None) -> dict | None:
    """write_rows, then close and commit; returns the writer's stats (None for `stop`: a simulated crash,
    never closed, never committed)."""
    w = write_rows(store, shard, batch, garbage, stop)
    if stop is not None:
        return None
    stats = w.close()
    w.commit({"attempts": 1, "duration_s": 0.5, "device": "cpu"})
    return stats


def read_arrays(url: str, so: dict | None) -> dict[str, np.ndarray]:
    g = zarr.open_group(url, mode="r", storage_options=so, zarr_format=3)
    out = {f"features/{name}": g[f"features/{name}"][:] for name in g["features"].array_keys()}
    out["keys"] = np.asarray(g["keys"][:].tolist(), dtype=str)
    out["valid"] = g["valid"][:]
    return out


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype or a[k].dtype.kind == b[k].dtype.kind == "U", k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@dataclass
class Target:
    url: str
    so: dict | None

    @property
    def fs(self):
        fs, root = fsspec.core.url_to_fs(self.url, **(self.so or {}))
        fs.invalidate_cache()
        return fs

    @property
    def root(self) -> str:
        return fsspec.core.url_to_fs(self.url, **(self.so or {}))[1]

    def objects(self, sub: str = "") -> list[str]:
        path = f"{self.root}/{sub}".rstrip("/")
        try:
            return sorted(p for p in self.fs.find(path))
        except FileNotFoundError:
            return []


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path) -> Target:
    if request.param == "local":
        return Target(str(tmp_path / "runs" / "run"), None)
    return Target("s3://test-bucket/runs/run", request.getfixturevalue("s3"))


def create(t: Target, counts=UNEQUAL, **kw) -> FeatureStore:
    kw.setdefault("config", CONFIG)
    return FeatureStore.create(t.url, make_shards(counts), LAYERS, storage_options=t.so, **kw)


def sequential_reference(tmp_path, counts=UNEQUAL, **kw) -> dict[str, np.ndarray]:
    """The same shards written one after the other by one writer (on local disk: the arrays must be
    identical wherever they were written)."""
    ref = Target(str(tmp_path / "reference"), None)
    store = create(ref, counts, **kw)
    for s in make_shards(counts):
        write_shard(store, s)
    store.finalize()
    return read_arrays(ref.url, ref.so)


# ---------------------------------------------------------------------------------------------
# pure functions


def test_plan_chunk_rows():
    assert plan_chunk_rows([8, 8, 8, 5], row_bytes=100) == 8  # equal shards: chunk = shard
    assert plan_chunk_rows([8, 8, 8, 5], row_bytes=1, chunk_bytes=3) == 2  # largest divisor that fits
    assert plan_chunk_rows([7, 13, 5], row_bytes=100) == 7  # unequal: capped at the median shard
    assert plan_chunk_rows([7, 13, 5], row_bytes=100, chunk_bytes=400) == 4
    assert plan_chunk_rows([10007, 10007, 3], row_bytes=16384) == 625  # prime size: no 1-row chunks
    assert plan_chunk_rows([10000] * 4, row_bytes=2048 * 49 * 4) * 2048 * 49 * 4 <= 64 * 2**20
    assert plan_chunk_rows([], row_bytes=4) == 1
    assert plan_chunk_rows([0, 5, 0, 5, 3], row_bytes=4) == 5  # empty shards are ignored
    # unequal shards (img2dataset's lose a few images each): chunks of the median size straddled nearly every
    # shard end, so nearly every row was staged and merged again by finalize; a sixteenth of it stages few
    from neuropredictor.store.layout import boundary_chunks

    counts = [1000 - (i * 37) % 50 for i in range(200)]
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    for row_bytes, staged_at_most in ((8192, 0.3), (2048 * 4 * 49, 0.15)):
        rows = plan_chunk_rows(counts, row_bytes=row_bytes)
        staged = sum(min((k + 1) * rows, sum(counts)) - k * rows for o, c in zip(offsets, counts)
                     for k in boundary_chunks(o, c, rows, sum(counts)))
        assert staged / sum(counts) <= staged_at_most and rows * row_bytes >= min(2**20, 1000 * row_bytes // 16)


def test_manifest_helpers():
    assert mf.config_hash({"a": 1, "b": [1, 2]}) == mf.config_hash({"b": (1, 2), "a": 1})
    assert mf.config_hash({"a": 1}) != mf.config_hash({"a": 2})
    assert mf.config_hash({"opts": {"secret": "x"}}) == mf.config_hash({"opts": {"secret": "y"}})
    diffs = mf.diff_configs({"model": "a", "opt": {"lr": 1, "x": 2}}, {"model": "b", "opt": {"lr": 1}, "new": 3})
    assert diffs == ['model: stored="a" requested="b"', "new: stored=<missing> requested=3",
                     "opt.x: stored=2 requested=<missing>"]
    red = mf.redact({"key": "AKIA", "aws_secret_access_key": "s", "hfToken": "t", "monkey": 1, "num_tokens": 197,
                     "nested": [{"Password": "p", "url": "https://u:pw@host/x?X-Amz-Signature=abc&a=1"}],
                     "empty_key": None})
    assert red == {"key": "***", "aws_secret_access_key": "***", "hfToken": "***", "monkey": 1, "num_tokens": 197,
                   "nested": [{"Password": "***", "url": "https://u:***@host/x?X-Amz-Signature=***&a=1"}],
                   "empty_key": None}
    sw = mf.software_versions()
    assert {"python", "zarr", "numpy"} <= set(sw) and sw["zarr"] == zarr.__version__


# ---------------------------------------------------------------------------------------------
# layout


def test_layout_and_dims(target: Target):
    store = create(target)
    assert store.manifest["status"] == "planned"
    assert [s.name for s in store.shards] == [s.name for s in make_shards(UNEQUAL)]
    assert store.layers == LAYERS and store.config == CONFIG
    for s in make_shards(UNEQUAL):
        write_shard(store, s)
    manifest = store.finalize()
    assert manifest["status"] == "complete"
    assert manifest["rows"] == {"total": 25, "committed": 25, "valid": 20, "invalid": 5}
    assert [e["status"] for e in manifest["shards"]] == ["committed"] * 3
    assert manifest["layers"][0] == {"name": "layer4.0.conv1", "shape": [3, 2], "dtype": "float32",
                                     "reduction": "avgpool"}

    # plain zarr: names with dots round-trip, named dims, NaN fill
    g = zarr.open_group(target.url, mode="r", storage_options=target.so)
    assert sorted(g["features"].array_keys()) == sorted(lay.name for lay in LAYERS)
    a = g["features/layer4.0.conv1"]
    assert a.shape == (25, 3, 2) and a.dtype == np.float32 and np.isnan(a.fill_value)
    assert a.metadata.dimension_names == ("stimulus", "layer4.0.conv1.dim_1", "layer4.0.conv1.dim_2")
    assert g["keys"].metadata.dimension_names == ("stimulus",)
    assert g["valid"].metadata.dimension_names == ("stimulus",) and g["valid"].fill_value == np.False_
    assert_same(read_arrays(target.url, target.so), expected_arrays(25))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # consolidated metadata must be found
        feats = xr.open_zarr(target.url, group="features", storage_options=target.so)
        root = xr.open_zarr(target.url, storage_options=target.so)
    assert feats["layer4.0.conv1"].dims == ("stimulus", "layer4.0.conv1.dim_1", "layer4.0.conv1.dim_2")
    assert feats["blocks.11"].dims == ("stimulus", "blocks.11.dim_1")
    assert root["keys"].dims == root["valid"].dims == ("stimulus",)
    assert root["valid"].dtype == bool

    ds = open_features(target.url, target.so)
    assert list(ds["key"].values[:3]) == ["img00000", "img00001", "img00002"]
    assert ds["key"].dims == ("stimulus",)
    np.testing.assert_array_equal(ds["valid"].values, expected_arrays(25)["valid"])
    np.testing.assert_array_equal(ds["blocks.11"].values, expected_arrays(25)["features/blocks.11"])


def test_float16(target: Target):
    store = create(target, [4, 4], dtype="float16", compression="blosc")
    for s in make_shards([4, 4]):
        write_shard(store, s)
    store.finalize()
    got = read_arrays(target.url, target.so)
    assert got["features/blocks.11"].dtype == np.float16
    assert_same(got, expected_arrays(8, "float16"))


def test_float16_overflow_is_refused_naming_the_layer(target: Target):
    # values over 65504 became inf in valid rows of a float16 store, and nothing said so
    store = create(target, [4], dtype="float16")
    (shard,) = make_shards([4])
    w = store.writer(shard)
    feats = {lay.name: np.ones((2, *lay.shape), np.float32) for lay in LAYERS}
    feats[LAYERS[0].name][1].flat[0] = 3e5
    feats[LAYERS[0].name][0].flat[0] = 1e9  # an invalid row: not checked
    with pytest.raises(StoreError, match=rf"layer {LAYERS[0].name!r}: 1 feature value\(s\) up to 3e\+05 do not fit "
                                         r"float16.*dtype='float32'"):
        w.write(0, ["a", "b"], [False, True], feats)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_in_valid_rows_are_refused(target: Target, bad):
    # fp16 autocast overflows in some networks (NaN/inf); stored in a valid row, nothing would tell it apart
    store = create(target, [4])
    (shard,) = make_shards([4])
    w = store.writer(shard)
    feats = {lay.name: np.ones((2, *lay.shape), np.float32) for lay in LAYERS}
    feats[LAYERS[1].name][0, 1] = bad
    w.write(0, ["a", "b"], [False, True], feats)  # an invalid row is stored as NaN anyway
    feats[LAYERS[1].name][0, 1], feats[LAYERS[1].name][1, 1] = 1.0, bad
    with pytest.raises(StoreError, match=rf"layer {LAYERS[1].name!r}: 1 feature value\(s\) in valid rows are NaN "
                                         r"or inf as the model computed them: with precision='fp16'"):
        w.write(2, ["c", "d"], [True, True], feats)


# ---------------------------------------------------------------------------------------------
# concurrency: no shared objects, same result as one writer


def test_threads_match_sequential(target: Target, tmp_path):
    reference = sequential_reference(tmp_path)
    store = create(target)
    errors = []

    def run(shard):
        try:
            write_shard(store, shard, batch=2)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in make_shards(UNEQUAL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # unequal shards share boundary chunks: those rows wait in staging until finalize
    assert target.objects("_staging")
    store.finalize()
    assert not target.objects("_staging")
    assert_same(read_arrays(target.url, target.so), reference)
    assert_same(reference, expected_arrays(25))


def _child_write(url: str, so: dict | None, shard: tuple[str, int, int]) -> dict:
    store = FeatureStore.open(url, so)
    return write_shard(store, Shard("unused", *shard), batch=4)


def test_processes_match_sequential(target: Target, tmp_path):
    reference = sequential_reference(tmp_path)
    store = create(target)
    # spawn: s3fs/aiohttp state is not fork-safe
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_child_write, target.url, target.so, (s.name, s.count, s.offset))
                   for s in make_shards(UNEQUAL)]
        stats = [f.result() for f in futures]
    assert sum(s["rows"] for s in stats) == 25
    assert set(store.committed()) == {s.name for s in make_shards(UNEQUAL)}
    store.finalize()
    assert_same(read_arrays(target.url, target.so), reference)


def test_equal_shards_stage_nothing(target: Target):
    counts = [6, 6, 6, 4]
    store = create(target, counts)
    assert set(store.chunk_rows.values()) == {6}
    threads = [threading.Thread(target=write_shard, args=(store, s)) for s in make_shards(counts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not target.objects("_staging")
    store.finalize()
    assert not target.objects("_staging")
    assert_same(read_arrays(target.url, target.so), expected_arrays(22))


# ---------------------------------------------------------------------------------------------
# commit records: what is trusted


def test_uncommitted_rows_are_not_trusted_and_rewrite_is_identical(target: Target):
    reference = expected_arrays(25)
    store = create(target)
    s0, s1, s2 = make_shards(UNEQUAL)
    write_shard(store, s0)
    write_shard(store, s2)
    write_shard(store, s1, garbage=True, stop=10)  # crashed half-way: some garbage chunks written
    assert store.is_committed(s0.name) and not store.is_committed(s1.name)

    manifest = store.finalize()
    assert manifest["status"] == "partial"
    assert [e["status"] for e in manifest["shards"]] == ["committed", "pending", "committed"]
    assert manifest["rows"]["committed"] == 12
    ds = open_features(target.url, target.so)
    valid = ds["valid"].values
    assert not valid[7:20].any()
    np.testing.assert_array_equal(valid[:7], reference["valid"][:7])
    np.testing.assert_array_equal(valid[20:], reference["valid"][20:])
    raw = read_arrays(target.url, target.so)
    assert np.isnan(raw["features/blocks.11"][14:20]).all()  # s1's staged rows were not merged
    np.testing.assert_array_equal(raw["features/blocks.11"][20:], reference["features/blocks.11"][20:])

    # the shard runs again from scratch; s2's rows merged by the first finalize must survive
    write_shard(store, s1)
    assert store.finalize()["status"] == "complete"
    assert_same(read_arrays(target.url, target.so), reference)
    assert open_features(target.url, target.so)["valid"].values.tolist() == reference["valid"].tolist()


def test_writer_withdraws_commit_and_pads_short_shards(target: Target):
    store = create(target)
    s0, s1, s2 = make_shards(UNEQUAL)
    write_shard(store, s1)
    assert store.is_committed(s1.name)
    w = store.writer(s1)  # a new attempt: the old rows are no longer trusted
    assert not store.is_committed(s1.name)
    w.write(0, ["a", "b"], np.array([True, True]), {lay.name: np.ones((2, *lay.shape), np.float32) for lay in LAYERS})
    with pytest.raises(StoreError, match="in order"):
        w.write(5, ["c"], np.array([True]), {lay.name: np.ones((1, *lay.shape), np.float32) for lay in LAYERS})
    with pytest.raises(StoreError, match="missing"):
        w.write(2, ["c"], np.array([True]), {"blocks.11": np.ones((1, 4), np.float32)})
    stats = w.close()
    assert stats["rows"] == 2 and stats["padded_rows"] == 11
    w.commit({})
    store.finalize()
    raw = read_arrays(target.url, target.so)
    assert raw["keys"][7:9].tolist() == ["a", "b"] and raw["valid"][7:20].tolist() == [True] * 2 + [False] * 11
    assert np.isnan(raw["features/blocks.11"][9:20]).all() and (raw["features/blocks.11"][7:9] == 1).all()


def test_commit_comes_after_data(target: Target):
    store = create(target)
    _, s1, _ = make_shards(UNEQUAL)
    w = store.writer(s1)
    for i in range(0, 13, 5):
        n = min(5, 13 - i)
        w.write(i, [f"k{i + j}" for j in range(n)], np.ones(n, bool),
                {lay.name: np.zeros((n, *lay.shape), np.float32) for lay in LAYERS})
    assert not store.is_committed(s1.name)
    w.commit({"attempts": 2})  # closes the writer first: the last rows are written before the record
    rec = store.committed()[s1.name]
    assert rec["attempts"] == 2 and rec["stats"]["rows"] == 13 and rec["stats"]["staged_objects"] == 4

    fs = target.fs
    status = f"{target.root}/_status/{s1.name}.json"
    data = [p for p in target.objects() if "/c/" in p or "/_staging/" in p]
    assert data

    def mtime(p):
        info = fs.info(p)
        m = info.get("mtime", info.get("LastModified"))
        return m.timestamp() if hasattr(m, "timestamp") else float(m)

    assert mtime(status) >= max(mtime(p) for p in data)

    # a commit whose staged rows are gone (deleted by another process meanwhile) is refused
    again = FeatureStore.open(target.url, target.so)
    s2 = make_shards(UNEQUAL)[2]
    w2 = write_rows(again, s2)
    w2.close()
    fs.rm(target.objects(f"_staging/{s2.name}")[0])
    with pytest.raises(StoreError, match="staged boundary"):
        w2.commit({})
    assert set(again.committed()) == {s1.name}  # s1's commit still stands, s2 has none


# ---------------------------------------------------------------------------------------------
# create: resume, mismatch, overwrite, foreign data


def test_config_mismatch_names_fields_and_writes_nothing(target: Target):
    store = create(target)
    write_shard(store, make_shards(UNEQUAL)[0])
    before = {p: target.fs.cat_file(p) for p in target.objects()}

    other = dict(CONFIG, model="timm:resnet18", precision="fp32")
    with pytest.raises(ConfigMismatchError) as exc:
        create(target, [7, 13, 6], config=other, dtype="float16")
    msg = str(exc.value)
    assert 'config.model: stored="timm:resnet50" requested="timm:resnet18"' in msg
    assert 'config.precision: stored="bf16" requested="fp32"' in msg
    assert 'dtype: stored="float32" requested="float16"' in msg
    assert "shards" in msg and "overwrite=True" in msg and "`out`" in msg
    assert "batch_size" not in msg
    assert {p: target.fs.cat_file(p) for p in target.objects()} == before

    with pytest.raises(ConfigMismatchError, match=r"layers\.blocks\.11"):
        FeatureStore.create(target.url, make_shards(UNEQUAL), [LAYERS[0], LayerSpec("blocks.11", (5,), "cls")],
                            CONFIG, storage_options=target.so)

    resumed = create(target)  # same request: resume, keep what was committed
    assert set(resumed.committed()) == {"shard-000"}
    assert {p: target.fs.cat_file(p) for p in target.objects()} == before


def test_overwrite_replaces(target: Target):
    store = create(target)
    write_shard(store, make_shards(UNEQUAL)[0])
    new_layers = [LayerSpec("head", (2,), "flatten")]
    store = FeatureStore.create(target.url, make_shards([5, 5]), new_layers, {"model": "other"},
                                storage_options=target.so, overwrite=True)
    assert store.manifest["config"] == {"model": "other"} and store.committed() == {}
    g = zarr.open_group(target.url, mode="r", storage_options=target.so)
    assert list(g["features"].array_keys()) == ["head"] and g["keys"].shape == (10,)
    assert not target.objects("_status")


def test_a_store_being_planned_elsewhere_is_not_taken_for_foreign_data(tmp_path):
    # A process writing _plan.json on local disk leaves `._plan.json.<hex>.tmp` for a moment: a second first
    # run seeing only that must plan (under the plan lease), not refuse the folder as someone else's.
    url = tmp_path / "run"
    url.mkdir()
    (url / f"._plan.json.{'a' * 32}.tmp").write_bytes(b"{")
    store = FeatureStore.create(str(url), make_shards(UNEQUAL), LAYERS, CONFIG)
    assert store.manifest["config_hash"] == mf.config_hash(CONFIG)
    other = tmp_path / "other"
    other.mkdir()
    (other / f".notes.{'a' * 32}.tmp").write_bytes(b"precious")  # not one of a store's files: a foreign folder
    with pytest.raises(StoreError, match="no neuropredictor store"):
        FeatureStore.create(str(other), make_shards(UNEQUAL), LAYERS, CONFIG)


def test_a_shard_named_like_a_failure_record_keeps_its_commit(tmp_path):
    # Shard x's failure record is `_status/x.failed.json`: a shard named `x.failed` had its commit there too,
    # so x failing took back x.failed's rows.
    plain, suffixed = [Shard(url=f"/corpus/{n}.tar", name=n, count=4, offset=o) for n, o in (("x", 0), ("x.failed", 4))]
    store = FeatureStore.create(str(tmp_path / "run"), [plain, suffixed], LAYERS, CONFIG)
    write_shard(store, suffixed)
    store.record_failure(plain, "RuntimeError: boom", attempts=3)
    assert set(store.committed()) == {"x.failed"}
    entries = {e["name"]: e for e in store.finalize()["shards"]}
    assert entries["x"]["status"] == "failed" and entries["x"]["error"] == "RuntimeError: boom"
    assert entries["x.failed"]["status"] == "committed"


def test_foreign_directory_is_refused(target: Target):
    fs = target.fs
    fs.makedirs(target.root, exist_ok=True)
    fs.pipe_file(f"{target.root}/notes.txt", b"precious")
    with pytest.raises(StoreError, match="not empty"):
        create(target)
    with pytest.raises(StoreError, match="no neuropredictor store"):
        FeatureStore.open(target.url, target.so)
    assert target.fs.cat_file(f"{target.root}/notes.txt") == b"precious"
    with pytest.raises(StoreError, match="not empty"):  # overwrite deletes stores only, never other things
        create(target, overwrite=True)
    assert target.fs.cat_file(f"{target.root}/notes.txt") == b"precious"


# ---------------------------------------------------------------------------------------------
# manifest content


def test_manifest_has_no_secrets(target: Target):
    config = dict(CONFIG, corpus="s3://alice:pa55word@minio:9000/corpus/{000..002}.tar",
                  storage_options={"key": "AKIAEXAMPLE", "secret": "s3cr3t-value", "endpoint_url": "http://x"},
                  hf_token="hf_tokenvalue")
    store = create(target, config=config)
    s0, s1, s2 = make_shards(UNEQUAL)
    write_rows(store, s0).commit({"attempts": 1, "images_per_s": 321.5, "api_key": "zzz-key-value", "device": "cuda:0",
                      "bad_samples": [{"key": "img00003", "reason": "truncated; see https://bob:hunter2@h/x"}]})
    store.record_failure(s1, "S3 error for s3://carol:letmein@host/x.tar?X-Amz-Credential=AKIAEXAMPLE; via "
                         "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=azUr3key==;EndpointSuffix=x; "
                         "https://a.blob.core.windows.net/c/x.tar?sv=2020-08-04&sig=sAsS1gnature", 3)
    manifest = store.finalize()

    texts = [target.fs.cat_file(p).decode() for p in target.objects() if p.endswith(".json")]
    for secret in ("AKIAEXAMPLE", "s3cr3t-value", "hf_tokenvalue", "pa55word", "zzz-key-value", "hunter2",
                   "letmein", "azUr3key", "sAsS1gnature"):
        assert not any(secret in t for t in texts), secret
    assert manifest["config"]["storage_options"] == {"key": "***", "secret": "***", "endpoint_url": "http://x"}
    e0, e1, e2 = manifest["shards"]
    assert e0["status"] == "committed" and e0["images_per_s"] == 321.5 and e0["device"] == "cuda:0"
    assert e1["status"] == "failed" and e1["attempts"] == 3 and "carol:***@" in e1["error"]
    assert e2["status"] == "pending" and e2["error"] is None
    assert manifest["bad_samples"] == [{"key": "img00003", "shard": s0.name,
                                        "reason": "truncated; see https://bob:***@h/x"}]
    assert manifest["config_hash"] == mf.config_hash(config)
    assert manifest["format"] == "neuropredictor-store/1" and "zarr" in manifest["software"]
    assert json.loads(target.fs.cat_file(f"{target.root}/manifest.json")) == manifest


def test_a_config_shown_in_a_notebook_hides_its_storage_options():
    from neuropredictor import ExtractConfig
    from neuropredictor.sweep import SweepConfig

    options = {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value"}
    extract = ExtractConfig(corpus="s3://b/c", model="timm:resnet18", layers=["a"], out="s3://b/o",
                            storage_options=options)
    sweep = SweepConfig(corpus="s3://b/c", models=["timm:resnet18"], out="s3://b/s", storage_options=options)
    for shown in (repr(extract), str(extract), repr(sweep)):  # were printed with the keys
        assert "AKIAEXAMPLE" not in shown and "s3cr3t-value" not in shown and "corpus=" in shown
    assert extract.storage_options == options  # still there for the run


def test_finalize_is_idempotent(target: Target):
    store = create(target)
    for s in make_shards(UNEQUAL):
        write_shard(store, s)
    first = store.finalize()
    arrays = read_arrays(target.url, target.so)
    objects = target.objects()
    second = FeatureStore.open(target.url, target.so).finalize()
    assert {k: v for k, v in first.items() if k != "updated"} == {k: v for k, v in second.items() if k != "updated"}
    assert_same(read_arrays(target.url, target.so), arrays)
    assert target.objects() == objects
    assert_same(arrays, expected_arrays(25))


def test_read_only_store_refuses_writes(target: Target):
    create(target)
    ro = FeatureStore.open(target.url, target.so, mode="r")
    with pytest.raises(StoreError, match="read-only"):
        ro.writer(make_shards(UNEQUAL)[0])
    with pytest.raises(StoreError, match="read-only"):
        ro.finalize()


@pytest.mark.parametrize("compression,codec", [("none", None), ("zstd:5", "zstd"), ("gzip", "gzip"),
                                               ("blosc", "blosc")])
def test_compression_options(tmp_path, compression, codec):
    t = Target(str(tmp_path / "run"), None)
    store = create(t, [4, 0, 4], compression=compression)  # an empty shard owns no rows and no chunk
    for s in make_shards([4, 0, 4]):
        write_shard(store, s)
    store.finalize()
    meta = zarr.open_array(t.url, path="features/blocks.11", mode="r").metadata.to_dict()
    names = [c["name"] for c in meta["codecs"]]
    assert names == ["bytes"] + ([codec] if codec else [])
    if compression == "zstd:5":
        assert meta["codecs"][1]["configuration"]["level"] == 5
    assert_same(read_arrays(t.url, None), expected_arrays(8))


def test_bad_options_and_torch_input(tmp_path):
    import torch

    t = Target(str(tmp_path / "run"), None)
    with pytest.raises(StoreError, match="bfloat16"):
        create(t, dtype="bfloat16")
    with pytest.raises(StoreError, match="compression"):
        create(t, compression="lzma")
    # numcodecs refused the level only when the arrays were made: the store stayed half planned, recording it
    for bad, top in (("zstd:99", "zstd:22"), ("blosc:10", "blosc:9"), ("gzip:12", "gzip:9")):
        with pytest.raises(StoreError, match=rf"level \d+ is out of range for \w+: use \w+:0 to {top}"):
            create(t, compression=bad)
    assert not os.path.exists(t.url)
    # a file where a store should be was a bare NotADirectoryError with a traceback
    (tmp_path / "afile.jpg").write_bytes(b"x")
    with pytest.raises(StoreError, match=r"cannot reach the store .*afile.jpg: NotADirectoryError: .* Check the path.$"):
        FeatureStore.open(str(tmp_path / "afile.jpg"), mode="r")
    with pytest.raises(StoreError, match="offset"):
        FeatureStore.create(t.url, make_shards([3, 3])[::-1], LAYERS, CONFIG)
    assert not t.objects()
    store = create(t, [2])
    (shard,) = make_shards([2])
    w = store.writer(shard)
    feats = {lay.name: torch.full((2, *lay.shape), 1.5, dtype=torch.bfloat16) for lay in LAYERS}
    w.write(0, ["a", "b"], np.array([True, True]), feats)
    w.commit({})
    assert (open_features(t.url)["layer4.0.conv1"].values == 1.5).all()
