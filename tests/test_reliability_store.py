"""Nothing lost, nothing silently wrong: the store under concurrent runs, kills at chosen points, damage and
a changed corpus. Each case compares with a clean run of the same configuration, array by array."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import make_images
from neuropredictor import ExtractConfig, run
from neuropredictor.corpus import make_shards
from neuropredictor.errors import StoreError
from neuropredictor.store import FeatureStore, locks, open_features
from neuropredictor.store import writer as store_writer

CUSTOM = f"custom:{Path(__file__).parent / 'custom_models.py'}:cifar_cnn"
TESTS = Path(__file__).parent


def _config(corpus, out, **kw) -> ExtractConfig:
    base = dict(corpus=corpus if isinstance(corpus, list) else str(corpus), model=CUSTOM, layers=["features.5"], reduce="full", out=str(out),
                batch_size=2, num_workers=0, retries=0, retry_delay_seconds=0)
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    make_images(root / "imgs", 24, nested=False)
    make_shards(root / "imgs", str(root / "shards"), maxcount=4)  # 6 shards
    return root / "shards"


def _shards_of(root: Path, sizes: tuple[int, ...]) -> list[str]:
    """Folders a, b, c, ... of one shard each, of these many samples."""
    make_images(root / "imgs", sum(sizes), nested=False)
    files = sorted((root / "imgs").iterdir())
    folders = []
    for i, size in enumerate(sizes):
        name, part = "abcdefgh"[i], files[sum(sizes[:i]):sum(sizes[:i + 1])]
        (root / f"src_{name}").mkdir()
        for f in part:
            (root / f"src_{name}" / f.name).write_bytes(f.read_bytes())
        make_shards(root / f"src_{name}", str(root / "shards" / name), maxcount=100, prefix=f"part{name}")
        folders.append(str(root / "shards" / name))
    return folders


@pytest.fixture(scope="module")
def unequal_corpus(tmp_path_factory) -> list[str]:
    """Shards of 7, 13 and 5 samples: boundary chunks, so finalize has rows to merge."""
    return _shards_of(tmp_path_factory.mktemp("unequal"), (7, 13, 5))


def _arrays(url: str) -> dict[str, np.ndarray]:
    g = zarr.open_group(url, mode="r")
    out = {f"features/{n}": g[f"features/{n}"][:] for n in g["features"].array_keys()}
    out["keys"] = np.asarray(g["keys"][:].tolist(), dtype=str)
    out["valid"] = g["valid"][:]
    return out


def _assert_identical(a_url: str, b_url: str) -> None:
    a, b = _arrays(a_url), _arrays(b_url)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory) -> dict[str, str]:
    """Clean runs to compare with: {layer: store url}."""
    root = tmp_path_factory.mktemp("clean")
    out = {}
    for layer in ("features.5", "features.2"):
        url = str(root / f"{layer}.zarr")
        run(_config(corpus, url, layers=[layer]))
        out[layer] = url
    return out


def _script(body: str, lease_s: float = 60.0) -> str:
    """A Python program for a child process: a run of `cfg` (JSON in argv[1]) with `body` first."""
    return textwrap.dedent(f"""
        import json, os, signal, sys, time
        sys.path.insert(0, {str(TESTS)!r})
        from neuropredictor import ExtractConfig, run
        from neuropredictor.store import locks
        locks.LEASE_SECONDS = {lease_s}
        cfg = ExtractConfig.model_validate_json(sys.argv[1])
        def die(*_):
            os.kill(os.getpid(), signal.SIGKILL)
        """) + textwrap.dedent(body)


def _spawn(code: str, cfg: ExtractConfig, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, cfg.model_dump_json()], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _commits(out: Path) -> list[Path]:
    return sorted(p for p in (out / "_status").glob("*.json") if not p.name.endswith(".failed.json"))


# ---------------------------------------------------------------------------------------------
# two configurations, one store


def test_replacing_a_store_another_run_is_writing_is_refused(corpus, clean, tmp_path):
    out = tmp_path / "out.zarr"
    slow = _script("""
        run(cfg, on_event=lambda e, d: time.sleep(0.3) if e == "batch" else None)
        """, lease_s=2.0)
    proc = _spawn(slow, _config(corpus, out), tmp_path)
    try:
        _wait_for(lambda: len(_commits(out)) >= 1 or proc.poll() is not None, what="the first commit")
        assert proc.poll() is None, proc.stderr.read()
        with pytest.raises(locks.StoreBusyError, match="another run is extracting into it"):
            run(_config(corpus, out, layers=["features.2"], overwrite=True))
        proc.send_signal(signal.SIGKILL)  # the first run dies without a word: its lease expires
        proc.wait(timeout=30)
    finally:
        proc.kill()
    # within the lease's lifetime a dead run still counts as alive; after it, the store can be replaced
    deadline = time.monotonic() + 30
    while True:
        try:
            locks.LEASE_SECONDS, old = 2.0, locks.LEASE_SECONDS
            manifest = run(_config(corpus, out, layers=["features.2"], overwrite=True))
            break
        except locks.StoreBusyError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        finally:
            locks.LEASE_SECONDS = old
    assert manifest["status"] == "complete" and manifest["rows"]["valid"] == 24
    assert sorted(zarr.open_group(str(out), mode="r")["features"].array_keys()) == ["features.2"]  # no stray array
    _assert_identical(clean["features.2"], str(out))


def test_a_stale_writer_can_never_commit_into_a_replaced_store(corpus, clean, tmp_path, monkeypatch):
    out = str(tmp_path / "out.zarr")
    from neuropredictor import plan

    old = plan(_config(corpus, out))
    stale = old.writer(old.shards[0])  # a run that paused (no live lease) while the store is replaced
    run(_config(corpus, out, layers=["features.2"], overwrite=True))
    monkeypatch.setattr(store_writer, "_FENCE_CHECK_S", 0.0)
    rows = {"features/features.5": np.zeros((4, 32, 8, 8), np.float32)}
    with pytest.raises(StoreError, match="replaced by another run"):
        stale.write(0, ["a", "b", "c", "d"], np.ones(4, bool), {"features.5": rows["features/features.5"]})
    with pytest.raises(StoreError, match="replaced by another run"):
        stale.commit({})
    new = FeatureStore.open(out)
    assert set(new.committed()) == {s.name for s in new.shards}
    assert new.verify() == {}
    _assert_identical(clean["features.2"], out)


def test_a_replacement_waits_for_a_finalize_of_the_old_store(corpus, tmp_path, monkeypatch):
    # A finalize writes the manifest last: a replacement that deleted the store meanwhile had its new plan under
    # the old run's manifest ('complete', the old layers) until a finalize of its own.
    from neuropredictor import extract_shard, plan
    from neuropredictor.store import staging

    out = str(tmp_path / "out.zarr")
    old = plan(_config(corpus, out))
    for shard in old.shards:
        extract_shard(_config(corpus, out), shard, store=old)
    merged, original = threading.Event(), staging.Staging.merge

    def slow_merge(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        merged.set()
        time.sleep(2)  # the manifest is written after this
        return result

    monkeypatch.setattr(staging.Staging, "merge", slow_merge)
    finalizing = threading.Thread(target=old.finalize)
    finalizing.start()
    assert merged.wait(60)
    new = plan(_config(corpus, out, layers=["features.2"], overwrite=True))
    finalizing.join(60)
    on_disk = json.loads((Path(out) / "manifest.json").read_text())
    assert on_disk["config_hash"] == new.manifest["config_hash"] and on_disk["status"] != "complete"


def test_records_of_another_generation_or_config_do_not_count(corpus, tmp_path):
    out = tmp_path / "out.zarr"
    run(_config(corpus, out))
    store = FeatureStore.open(str(out))
    assert len(store.committed()) == 6
    rec_path = _commits(out)[0]
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps(dict(rec, generation="0" * 32)))
    other = _commits(out)[1]
    other.write_text(json.dumps(dict(json.loads(other.read_text()), config_hash="f" * 64)))
    assert len(store.committed()) == 4
    manifest = run(_config(corpus, out))  # the two shards run again
    assert manifest["status"] == "complete" and len(FeatureStore.open(str(out)).committed()) == 6


@pytest.mark.parametrize("manifest", ["kept", "damaged"])
@pytest.mark.parametrize("generation", ["lost", "damaged"])
def test_a_lost_generation_file_is_restored_and_the_commits_kept(corpus, tmp_path, generation, manifest):
    # a store whose _generation.json was lost or damaged was planned again from scratch: every committed
    # shard extracted again, its records rewritten, without a word
    out = tmp_path / "out.zarr"
    run(_config(corpus, out))
    records = {p.name: p.read_bytes() for p in _commits(out)}
    gen_file = out / "_generation.json"
    original = json.loads(gen_file.read_text())["generation"]
    gen_file.unlink() if generation == "lost" else gen_file.write_text('{"generat')
    if manifest == "damaged":
        (out / "manifest.json").write_text("{")
    again = run(_config(corpus, out))
    assert again["status"] == "complete" and again["generation"] == original
    assert {p.name: p.read_bytes() for p in _commits(out)} == records  # nothing ran again
    assert json.loads(gen_file.read_text())["generation"] == original


def test_a_plan_killed_after_its_generation_reads_as_planned(corpus, tmp_path):
    # killed between the generation (written once the arrays exist) and its manifest: `inspect` said the
    # store was still being planned, and the manifest said so to every reader
    from neuropredictor.pipeline import plan

    out = tmp_path / "out.zarr"
    plan(_config(corpus, out))
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "status": "planning"}))
    assert FeatureStore.open(str(out)).status_manifest()["status"] == "planned"


def test_a_store_a_killed_replacement_half_deleted_is_planned_again(corpus, tmp_path):
    # a replacement deletes the generation first, then the arrays: killed between them, the store has its
    # plan, manifest and records but not all of its arrays, and must not be restored as it was
    import shutil

    out = tmp_path / "out.zarr"
    run(_config(corpus, out))
    (out / "_generation.json").unlink()
    shutil.rmtree(out / "keys")
    again = run(_config(corpus, out))
    assert again["status"] == "complete" and again["rows"]["valid"] == 24
    assert len(open_features(str(out))["key"]) == 24


def test_rows_reach_the_disk_before_the_records_that_vouch_for_them(unequal_corpus, tmp_path, monkeypatch):
    # review: zarr's LocalStore writes chunk files without fsync, while a commit record is fsynced: after a power
    # loss a record could name chunks the kernel had not written back (read as NaN and valid False, the store
    # complete), and a finalize could delete staged rows whose merged chunk was not yet on the disk
    from neuropredictor.store import staging

    events: list[tuple[str, str]] = []
    real_fsync, real_remove = os.fsync, staging.fsx.remove_tree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(staging.fsx, "remove_tree", lambda fs, path: (events.append(("remove", path)),
                                                                       real_remove(fs, path))[1])
    out = tmp_path / "out.zarr"
    manifest = run(_config(unequal_corpus, out))

    def first(kind: str, match) -> int:
        return next((i for i, (k, p) in enumerate(events) if k == kind and match(p)), len(events))

    group = zarr.open_group(str(out), mode="r")
    arrays = [group[f"features/{n}"] for n in group["features"].array_keys()] + [group["keys"], group["valid"]]
    checked = {"own": 0, "merged": 0}
    for shard in manifest["shards"]:
        lo, hi = shard["offset"], shard["offset"] + shard["rows"]
        record = first("sync", lambda p, n=shard["name"]: f"/_status/.{n}.json." in p)
        assert record < len(events)
        for arr in arrays:
            c = arr.chunks[0]
            for k in range(lo // c, (hi - 1) // c + 1):
                chunk = str(out / arr.path / arr.metadata.encode_chunk_key((k, *(0,) * (arr.ndim - 1))))
                synced = first("sync", lambda p, f=chunk: p == f)
                if k * c >= lo and min((k + 1) * c, arr.shape[0]) <= hi:  # the shard's own chunk
                    assert synced < record, (chunk, shard["name"])
                    checked["own"] += 1
                else:  # shared: merged by finalize, on the disk before the shard's staged rows are deleted
                    assert synced < first("remove", lambda p, n=shard["name"]: p.endswith(f"_staging/{n}"))
                    # and the shard's staged piece (synced as it was written) in its folder before the record
                    attempt = json.loads((out / "_status" / f"{shard['name']}.json").read_text())["staging"]
                    folder = str(out / "_staging" / shard["name"] / attempt / arr.path)
                    assert first("sync", lambda p, f=folder: p == f) < record, folder
                    checked["merged"] += 1
    assert checked["own"] and checked["merged"]  # the corpus has both kinds of chunk


def test_a_filesystem_that_cannot_sync_folders_costs_a_warning_not_the_run(corpus, clean, tmp_path, monkeypatch,
                                                                           caplog):
    # review: some FUSE, 9p and network mounts refuse to fsync a folder (EINVAL): every commit failed
    import errno
    import stat

    from neuropredictor import fs as fsx

    real_fsync = os.fsync

    def refuse_folders(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", refuse_folders)
    monkeypatch.setattr(fsx, "_unsynced_warned", set())
    out = tmp_path / "out.zarr"
    with caplog.at_level("WARNING", logger="neuropredictor.fs"):
        assert run(_config(corpus, out))["status"] == "complete"
    _assert_identical(clean["features.5"], str(out))
    said = [r.message for r in caplog.records if "cannot sync" in r.message]
    assert len(said) == 1 and "Invalid argument" in said[0], said  # once, not once per shard


def test_rows_waiting_for_finalize_never_read_as_valid(tmp_path, monkeypatch):
    # review: each array has chunks of its own size, so a shard end can fall inside a feature chunk (staged, fill
    # until finalize) while `valid`'s chunk there is the shard's own (True): such rows read as valid with NaN
    # features before finalize, and with the previous attempt's features after a shard was extracted again
    from neuropredictor import extract_shard, finalize, plan
    from neuropredictor.store import layout

    corpus = _shards_of(tmp_path, (17, 20, 16))
    monkeypatch.setattr(layout, "MIN_CHUNK_BYTES", 4 * 8192)  # feature chunks of 4 rows, `valid`'s of 17
    cfg = _config(corpus, tmp_path / "out.zarr")
    store = plan(cfg)
    assert store.chunk_rows["features/features.5"] == 4 and store.chunk_rows["valid"] == 17
    for shard in store.shards:
        extract_shard(cfg, shard, store=store)

    def valid_rows_hold_what_was_committed(expected: np.ndarray) -> None:
        ds = open_features(cfg.out)
        valid = ds["valid"].values
        got = ds["features.5"].values.reshape(len(valid), -1)
        assert valid.sum() > 0
        np.testing.assert_array_equal(got[valid], expected[valid])

    before = open_features(cfg.out)  # committed, not finalized: the staged rows are not in the arrays yet
    assert not np.isnan(before["features.5"].values.reshape(53, -1)[before["valid"].values]).any()
    finalize(cfg)
    first = open_features(cfg.out)["features.5"].values.reshape(53, -1)
    valid_rows_hold_what_was_committed(first)
    # shard b (rows 17..36) extracted again with other rows, and not finalized (a run killed after its commit)
    b = store.shards[1]
    writer = store.writer(b)
    other = np.full((b.count, 32, 8, 8), 7.0, dtype=np.float32)
    writer.write(0, [f"k{i}" for i in range(b.count)], np.ones(b.count, bool), {"features.5": other})
    writer.commit()
    expected = first.copy()
    expected[b.offset:b.end] = 7.0
    valid_rows_hold_what_was_committed(expected)
    finalize(cfg)
    valid_rows_hold_what_was_committed(expected)
    assert open_features(cfg.out)["valid"].values.all()


def test_verify_during_a_finalize_finds_no_damage(unequal_corpus, tmp_path):
    # verify read a shard's rows, then its staged boundary piece: a finalize that merged and deleted the
    # piece in between made a healthy shard read as damaged (and `run(verify=True)` withdrew it)
    from neuropredictor import extract_shard, plan

    out = str(tmp_path / "out.zarr")
    config = _config(unequal_corpus, out, batch_size=3)
    store = plan(config)
    for shard in store.shards:
        extract_shard(config, shard, store)  # committed; their boundary rows wait in staging
    verifier = FeatureStore.open(out)
    fs, cat_file, finalized = verifier._fs, verifier._fs.cat_file, []

    def another_run_finalizes_first(path, *args, **kwargs):  # at verify's first read of a staged piece
        if "_staging" in str(path) and not finalized:
            finalized.append("started")  # the finalize reads staged pieces too: once only
            finalized[0] = FeatureStore.open(out).finalize()["status"]
        return cat_file(path, *args, **kwargs)

    fs.cat_file = another_run_finalizes_first
    try:
        assert verifier.verify() == {}
    finally:
        fs.cat_file = cat_file
    assert finalized == ["complete"] and FeatureStore.open(out).verify() == {}


# ---------------------------------------------------------------------------------------------
# damage


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _chunks(out: Path, layer: str = "features.5") -> list[Path]:
    return sorted((out / "features" / layer / "c").rglob("*"), key=lambda p: p.as_posix())


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damaged_chunks_are_found_and_exactly_their_shards_extracted_again(corpus, clean, tmp_path, damage):
    out = tmp_path / "out.zarr"
    run(_config(corpus, out))
    chunk = [p for p in _chunks(out) if p.is_file()][2]  # chunk size = shard size: chunk 2 is shard 2's
    _flip_a_byte(chunk) if damage == "flip" else chunk.unlink()
    store = FeatureStore.open(str(out))
    damaged = store.verify()
    assert list(damaged) == ["shard-000002"], damaged
    assert FeatureStore.open(str(out), mode="r").manifest["status"] == "complete"  # verify is read-only
    before = {p.name: p.stat().st_mtime_ns for p in _commits(out)}
    manifest = run(_config(corpus, out, verify=True))
    after = {p.name: p.stat().st_mtime_ns for p in _commits(out)}
    assert [n for n in after if after[n] != before.get(n)] == ["shard-000002.json"]  # only it ran again
    assert manifest["status"] == "complete" and FeatureStore.open(str(out)).verify() == {}
    _assert_identical(clean["features.5"], str(out))


@pytest.mark.parametrize("path, damage", [("features/features.5/zarr.json", "truncate"), ("keys/zarr.json", "delete"),
                                          ("zarr.json", "truncate"), ("valid/zarr.json", "shape")])
def test_damaged_zarr_metadata_is_found_and_written_again_from_the_plan(corpus, clean, tmp_path, path, damage):
    # a damaged array zarr.json left every shard unreadable: verify withdrew them all, and no run could write
    # them again; its chunks are intact, so the metadata is what has to be made again
    out = tmp_path / "out.zarr"
    run(_config(corpus, out))
    meta = out / path
    original = json.loads(meta.read_text())
    if damage == "truncate":
        meta.write_text(meta.read_text()[:60])
    elif damage == "delete":
        meta.unlink()
    else:
        meta.write_text(json.dumps(original | {"shape": [original["shape"][0] + 1]}))
    store = FeatureStore.open(str(out), mode="r")
    why = {"truncate": "not JSON", "delete": "missing", "shape": "differs from the plan in shape"}[damage]
    assert list(store.damaged_metadata()) == [path] and why in store.damaged_metadata()[path]
    assert store.verify() == {}  # the damaged array's chunks are not blamed on the shards
    if path != "zarr.json" and damage != "shape":  # unreadable: a run that writes its rows says what to do
        with pytest.raises(StoreError, match=f"{path}.*verify.*rows are kept"):
            FeatureStore.open(str(out)).array(path.removesuffix("/zarr.json"))
    before = {p.name: p.stat().st_mtime_ns for p in _commits(out)}
    manifest = run(_config(corpus, out, verify=True))
    assert {p.name: p.stat().st_mtime_ns for p in _commits(out)} == before  # nothing extracted again
    assert manifest["status"] == "complete" and FeatureStore.open(str(out)).damaged_metadata() == {}
    assert {k: v for k, v in json.loads(meta.read_text()).items() if k != "consolidated_metadata"} \
        == {k: v for k, v in original.items() if k != "consolidated_metadata"}
    _assert_identical(clean["features.5"], str(out))
    assert open_features(str(out))["features.5"].shape == (24, *_arrays(clean["features.5"])["features/features.5"].shape[1:])


def test_a_truncated_commit_record_counts_as_not_committed(corpus, clean, tmp_path):
    out = tmp_path / "out.zarr"
    run(_config(corpus, out))
    rec = _commits(out)[3]
    rec.write_bytes(rec.read_bytes()[:40])
    store = FeatureStore.open(str(out))
    assert len(store.committed()) == 5 and not store.is_committed(rec.stem)
    assert run(_config(corpus, out))["status"] == "complete"
    assert json.loads(rec.read_text())["shard"] == rec.stem
    _assert_identical(clean["features.5"], str(out))


def test_a_damaged_manifest_is_rebuilt_from_the_plan_and_records(corpus, clean, tmp_path):
    out = tmp_path / "out.zarr"
    run(_config(corpus, out))
    (out / "manifest.json").write_text('{"format": "neuropredictor-sto')
    store = FeatureStore.open(str(out), mode="r")
    assert store.repairs and store.manifest["rows"]["committed"] == 24
    assert run(_config(corpus, out))["status"] == "complete"  # resumes: nothing to extract, finalize rewrites it
    assert json.loads((out / "manifest.json").read_text())["rows"]["valid"] == 24
    (out / "manifest.json").write_text("")
    (out / "_plan.json").write_text("{")
    with pytest.raises(StoreError, match="damaged"):
        FeatureStore.open(str(out))


# ---------------------------------------------------------------------------------------------
# a changed corpus, overwrite


def test_a_changed_shard_is_refused_on_resume(tmp_path, caplog):
    from neuropredictor import extract_shard, plan
    from neuropredictor.errors import CorpusError

    make_images(tmp_path / "imgs", 8, nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=4)
    out = tmp_path / "out.zarr"
    cfg = _config(tmp_path / "shards", out)
    store = plan(cfg)
    extract_shard(cfg, store.shards[0], store=store)  # interrupted after one shard
    original = (tmp_path / "shards" / "shard-000000.tar").read_bytes()
    # the committed shard replaced by other images of the same count
    make_images(tmp_path / "other", 8, nested=False, seed=7)
    make_shards(tmp_path / "other", str(tmp_path / "other-shards"), maxcount=4)
    (tmp_path / "shards" / "shard-000000.tar").write_bytes((tmp_path / "other-shards" / "shard-000000.tar").read_bytes())
    with pytest.raises(CorpusError, match="changed since their rows were extracted.*shard-000000"):
        run(cfg)
    # with overwrite, the shard is taken back to be extracted again, and the plan says so, once, with why
    with caplog.at_level("WARNING", logger="neuropredictor.pipeline"):
        assert list(plan(_config(tmp_path / "shards", out, overwrite=True)).withdrawn) == ["shard-000000"]
    assert [r.getMessage() for r in caplog.records if "shard-000000" in r.getMessage()] == [
        "1 committed shard(s) are extracted again: shard-000000 (its shard file changed since its rows were extracted)"]
    # the original bytes back (a new mtime, as after a copy): the same file, so the run resumes
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(original)
    assert run(cfg)["status"] == "complete"
    clean = str(tmp_path / "clean.zarr")
    run(_config(tmp_path / "shards", clean))
    _assert_identical(clean, str(out))


def test_overwrite_deletes_only_a_store_and_says_what(corpus, tmp_path):
    from neuropredictor import plan

    out = tmp_path / "out.zarr"
    run(_config(corpus, out))
    (out / "notes.txt").write_text("mine")
    same = plan(_config(corpus, out, overwrite=True))  # the same configuration: resumed, nothing deleted
    assert same.replaced is None and len(same.committed()) == 6
    other = plan(_config(corpus, out, layers=["features.2"], overwrite=True))
    assert other.replaced["committed_shards"] == 6 and other.replaced["kept"] == ["notes.txt"]
    assert "features" in other.replaced["deleted"] and "_status" in other.replaced["deleted"]
    assert (out / "notes.txt").read_text() == "mine" and other.committed() == {}


# ---------------------------------------------------------------------------------------------
# concurrent runs of one configuration; kills at chosen points


def test_concurrent_runs_of_one_configuration_join_safely(corpus, clean, tmp_path):
    out = tmp_path / "out.zarr"
    code = _script("""
        manifest = run(cfg)
        print(json.dumps({"status": manifest["status"]}))
        """)
    procs = [_spawn(code, _config(corpus, out), tmp_path) for _ in range(4)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert {r["status"] for r in results} == {"complete"}
    assert [p.stem for p in _commits(out)] == [f"shard-{i:06d}" for i in range(6)]
    assert not list((out / "_runs").glob("*.json")) and not list((out / "_locks").glob("**/*.json"))
    _assert_identical(clean["features.5"], str(out))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_runs_of_one_command_share_the_shards_each_extracted_once(corpus, clean, tmp_path, request, where):
    # two runs at once (a job array, a deployment run twice) extracted every shard twice; with other batch
    # sizes, the later writer's rows landed after the first one's commit and no longer matched its checksums
    import fsspec

    options = request.getfixturevalue("s3") if where == "s3" else None
    out = "s3://test-bucket/shared.zarr" if where == "s3" else str(tmp_path / "out.zarr")
    code = _script("""
        from neuropredictor.store import FeatureStore
        from neuropredictor.store.writer import ShardWriter
        session = FeatureStore.session
        def session_when_both_run(self, *a, **k):  # both runs extract at once, whatever their start-up times
            lease = session(self, *a, **k)
            for _ in range(600):
                if len(locks.live(self._fs, self._root + "/_runs")) >= 2:
                    break
                time.sleep(0.1)
            return lease
        FeatureStore.session = session_when_both_run
        write = ShardWriter.write
        def slow_write(self, *a, **k):
            time.sleep(0.2)
            return write(self, *a, **k)
        ShardWriter.write = slow_write
        events = []
        manifest = run(cfg, on_event=lambda e, d: events.append([d["name"], bool(d["record"].get("skipped"))])
                       if e == "shard" else None)
        print(json.dumps({"status": manifest["status"], "shards": events}))
        """)
    procs = [_spawn(code, _config(corpus, out, batch_size=b, storage_options=options), tmp_path) for b in (2, 3)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert {r["status"] for r in results} == {"complete"}
    names = [f"shard-{i:06d}" for i in range(6)]
    extracted = [{n for n, skipped in r["shards"] if not skipped} for r in results]
    assert not extracted[0] & extracted[1] and extracted[0] | extracted[1] == set(names)
    for r in results:  # the other run's shards reached this run's progress too
        assert sorted(n for n, _ in r["shards"]) == names
    assert FeatureStore.open(out, options).verify() == {}
    a, b = open_features(clean["features.5"]), open_features(out, options)
    np.testing.assert_array_equal(a.key.values, b.key.values)
    np.testing.assert_allclose(a["features.5"].values, b["features.5"].values, rtol=1e-5, atol=1e-6)
    fs = fsspec.filesystem("s3", **options) if options else fsspec.filesystem("file")
    fs.invalidate_cache()
    assert not [p for p in fs.find(out.removeprefix("s3://") + "/_locks") if p.endswith(".json")]


def test_a_run_left_waiting_for_a_shard_another_run_holds_says_so(corpus, tmp_path, monkeypatch, caplog):
    # review: a run waiting (a minute) for a shard a dead run on another machine held showed a frozen progress bar;
    # why went to the log file only
    import logging

    from neuropredictor import schedule
    from neuropredictor.pipeline import plan

    monkeypatch.setattr(schedule, "BUSY_POLL_S", 0.05)
    config = _config(corpus, tmp_path / "out.zarr")
    store = plan(config)
    held = FeatureStore.open(config.out).claim(store.shards[0])  # another run, extracting it now
    done: dict = {}
    with caplog.at_level(logging.WARNING, logger="neuropredictor.schedule"):
        worker = threading.Thread(target=lambda: done.update(manifest=run(config)))
        worker.start()
        _wait_for(lambda: all(store.is_committed(s.name) for s in store.shards[1:]), what="the free shards")
        _wait_for(lambda: "waiting for" in caplog.text, what="the warning")
        time.sleep(0.3)  # several polls: said once
        held.release()
        worker.join(60)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert len(said) == 1 and "claim then expires" in said[0]
    assert said[0].startswith(f"waiting for 1 shard(s) that other runs extract (shard {store.shards[0].name} is being "
                              f"extracted by run {held.run_id}")
    assert done["manifest"]["status"] == "complete"


def test_a_shard_another_run_extracts_waits_for_it(corpus, tmp_path, monkeypatch):
    from neuropredictor import schedule
    from neuropredictor.errors import Interrupted
    from neuropredictor.pipeline import plan

    monkeypatch.setattr(schedule, "BUSY_POLL_S", 0.05)
    config = _config(corpus, tmp_path / "out.zarr")
    store = plan(config)
    first, second = store.shards[:2]
    held = FeatureStore.open(config.out).claim(first)  # another run, extracting it now
    with pytest.raises(StoreError, match=f"shard {first.name} is being extracted by run {held.run_id}"):
        store.claim(first)
    done: dict = {}
    worker = threading.Thread(
        target=lambda: done.update(records=schedule.extract_group(config, [first, second], store)))
    worker.start()
    _wait_for(lambda: store.is_committed(second.name), what="the group's free shard")
    time.sleep(0.3)
    assert worker.is_alive() and not store.is_committed(first.name)  # waiting, not writing
    held.release()  # that run gave it up (it failed): this one extracts it
    worker.join(60)
    assert [r["shard"] for r in done["records"]] == [second.name, first.name]
    assert not any(r.get("skipped") for r in done["records"]) and store.is_committed(first.name)

    # stopped while waiting: Interrupted, nothing recorded as failed
    third = store.shards[2]
    held = FeatureStore.open(config.out).claim(third)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(Interrupted, match=f"waiting for shard {third.name}"):
        schedule.extract_group(config, [third], store, stop=stop)
    held.release()
    assert not store.records.by_kind()[1]


def test_a_run_does_the_other_shards_while_another_run_holds_one(corpus, tmp_path, monkeypatch):
    # without Prefect a group is one shard: the run's device waited for the held shard, its others queued
    from neuropredictor import schedule
    from neuropredictor.pipeline import extract_shard, plan

    monkeypatch.setattr(schedule, "BUSY_POLL_S", 0.05)
    config = _config(corpus, tmp_path / "out.zarr")
    first = plan(config).shards[0]
    other = FeatureStore.open(config.out)
    held = other.claim(first)  # another run is extracting the first shard
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(manifest=run(config)))
    runner.start()
    store = FeatureStore.open(config.out)
    _wait_for(lambda: len(store.committed()) == 5, what="the other five shards")
    assert not store.is_committed(first.name) and runner.is_alive()
    monkeypatch.setattr(other, "claim", lambda shard: held)  # that run commits it, then lets go
    extract_shard(config, first, store=other)
    runner.join(60)
    assert outcome["manifest"]["status"] == "complete"


def test_a_claim_whose_process_died_on_this_machine_is_taken_at_once(tmp_path):
    # a run killed for its memory held its shards' claims for a minute more: its rerun waited for its own
    import fsspec

    fs, path = fsspec.filesystem("file"), str(tmp_path / "claim.json")
    code = ("import fsspec, os, signal, sys\nfrom neuropredictor.store import locks\n"
            "locks.acquire(fsspec.filesystem('file'), sys.argv[1], 'extracting', wait_s=0)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, path], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    dead = json.loads(fs.cat_file(path))
    assert dead["expires_at"] > time.time() + 30  # not expired: its process is gone
    taken = locks.try_acquire(fs, path, "extracting")
    assert isinstance(taken, locks.Lease) and json.loads(fs.cat_file(path))["run_id"] == taken.run_id
    # a live process's claim (this one's, another run id) stands
    other = locks.try_acquire(fs, path, "extracting")
    assert isinstance(other, dict) and other["run_id"] == taken.run_id
    taken.release()


def test_a_dead_lease_with_a_takers_marker_left_is_taken_once_the_marker_is_spent(tmp_path, monkeypatch):
    # a taker killed between its marker and the removal left both: acquire gave up within seconds ("changed
    # hands 100 times") instead of waiting for the marker to be spent
    import fsspec

    fs, path = fsspec.filesystem("file"), str(tmp_path / "plan.json")
    monkeypatch.setattr(locks, "LEASE_SECONDS", 2.0)  # the marker is spent after a lifetime
    monkeypatch.setattr(locks, "_POLL_SECONDS", 0.002)  # many turns within it
    raw = json.dumps({**locks._record("dead-run", "planning", 2.0), "expires_at": 0}).encode()
    fs.pipe_file(path, raw)
    import hashlib

    fs.pipe_file(f"{path}.taken-{hashlib.sha256(raw).hexdigest()[:16]}", b"")  # the killed taker's marker
    lease = locks.acquire(fs, path, "planning", wait_s=30)
    assert json.loads(fs.cat_file(path))["run_id"] == lease.run_id
    lease.release()


def test_liveness_on_this_machine_tells_zombies_and_reused_pids(tmp_path):
    import fsspec

    fs, path = fsspec.filesystem("file"), str(tmp_path / "claim.json")
    code = ("import fsspec, os, sys\nfrom neuropredictor.store import locks\n"
            "locks.acquire(fsspec.filesystem('file'), sys.argv[1], 'extracting', wait_s=0)\nos._exit(0)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, path])
    try:
        _wait_for(lambda: (locks._process(proc.pid) or ("Z",))[0] == "Z", what="the child to exit")
        assert locks._process(proc.pid) is not None  # not reaped: a zombie, whose pid still answers signal 0
        assert isinstance(locks.try_acquire(fs, path, "extracting"), locks.Lease)
    finally:
        proc.wait()
    alive = {**locks._record("r", "extracting", 60), "pid": os.getppid()}
    alive["started"] = locks._process(os.getppid())[1]
    assert not locks.expired(alive)
    assert locks.expired({**alive, "started": str(int(alive["started"]) + 1)})  # that pid, another process


def test_a_forked_or_hidden_process_is_not_taken_for_dead(tmp_path, monkeypatch):
    # a forked child recorded its parent's start time, so its siblings took its live leases at once; and a
    # process whose /proc entry is hidden (hidepid, another user's) counted as gone
    import fsspec

    fs, path = fsspec.filesystem("file"), str(tmp_path / "claim.json")
    ready = tmp_path / "ready"
    pid = os.fork()
    if pid == 0:  # the child: take the lease, say so, then live until killed
        try:
            locks.acquire(fs, path, "extracting", wait_s=0)
            ready.touch()
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        _wait_for(ready.exists, what="the child's lease")
        holder = locks.try_acquire(fs, path, "extracting")
        assert isinstance(holder, dict) and holder["pid"] == pid and holder["started"] == locks._process(pid)[1]
        monkeypatch.setattr(locks, "_process", lambda _pid: None)  # /proc hides it: signal 0 says it lives
        assert not locks.expired(holder)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert locks.expired(holder)  # gone: signal 0 says so too


def test_a_shard_held_longer_than_the_wait_is_reported_not_waited_for_ever(monkeypatch):
    from neuropredictor import schedule
    from neuropredictor.shard import Shard

    monkeypatch.setattr(schedule, "BUSY_WAIT_S", 0.05)
    monkeypatch.setattr(schedule, "BUSY_POLL_S", 0.0)
    shard = Shard(name="s0", url="s0.tar", offset=0, count=4)
    window = schedule.DeviceWindow([[shard]], ["cpu"])
    busy = {"s0": "shard s0 is being extracted by run r"}
    for _ in range(2):  # found busy, looked at again later, still busy
        assert window.start() == [([shard], "cpu")]
        window.finish([shard], "cpu", None, lambda _name: False, busy=busy)
        assert not window.failed and window.waiting_s() == 0.0
    time.sleep(0.1)
    assert window.start() == [([shard], "cpu")]
    window.finish([shard], "cpu", None, lambda _name: False, busy=busy)
    assert window.failed == {"s0": "shard s0 is being extracted by run r for over 0 h"}
    assert window.waiting_s() is None and window.start() == []


def test_a_stuck_holder_of_a_shard_is_taken_over(corpus, tmp_path, monkeypatch):
    # a holder alive but stuck (a hung decoder) renews its claim for ever: its rows not advancing for
    # STUCK_SECONDS, its shard is taken over, and the holder stops at its next write
    from neuropredictor import schedule
    from neuropredictor.pipeline import plan

    monkeypatch.setattr(schedule, "BUSY_POLL_S", 0.05)
    monkeypatch.setattr(locks, "STUCK_SECONDS", 0.5)
    monkeypatch.setattr(locks, "LEASE_SECONDS", 0.6)
    config = _config(corpus, tmp_path / "out.zarr")
    store = plan(config)
    shard = store.shards[0]
    held = FeatureStore.open(config.out).claim(shard)
    held.progress = lambda: 2  # two rows written, then nothing more
    records = schedule.extract_group(config, [shard], store)
    assert not records[0].get("skipped") and store.is_committed(shard.name)
    with pytest.raises(locks.StoreBusyError, match="lost the lease"):
        held.check()
    held.release()


def test_a_writer_whose_lease_ran_out_unseen_writes_nothing_more(corpus, tmp_path):
    # a machine suspended for minutes: the throttled check had run just before, and the writer wrote its next
    # chunks over rows another run had extracted and committed meanwhile
    from neuropredictor.pipeline import plan

    config = _config(corpus, tmp_path / "out.zarr")
    store = plan(config)
    shard = store.shards[0]
    claim = store.claim(shard)
    writer = store.writer(shard, claim=claim)
    claim._stop.set()  # no more renewals, as when suspended; the lifetime is over by the wall clock
    claim.expires_at = time.time()
    Path(claim.path).write_text(json.dumps({**json.loads(Path(claim.path).read_text()), "expires_at": time.time()}))
    rows = np.ones((4, *store.layers[0].shape), dtype=np.float32)
    with pytest.raises(locks.StoreBusyError, match="lost the lease"):
        writer.write(0, ["a", "b", "c", "d"], np.ones(4, bool), {store.layers[0].name: rows})
    claim.release()


def test_a_commit_never_replaces_one_another_run_made_meanwhile(corpus, tmp_path):
    from neuropredictor.pipeline import extract_shard, plan

    config = _config(corpus, tmp_path / "out.zarr")
    store = plan(config)
    shard = store.shards[0]
    # its claim lost at the last moment, after the fence's check (or a writer without a claim)
    writer = store.writer(shard, replace_commit=False)
    theirs = extract_shard(config, shard, store=FeatureStore.open(config.out))
    with pytest.raises(StoreError, match="committed by another run"):
        writer.commit()
    assert store.commit_record(shard.name)["committed_at"] == theirs["committed_at"]


def test_a_writer_whose_claim_was_taken_over_writes_nothing_more(corpus, tmp_path, monkeypatch):
    from neuropredictor.pipeline import plan

    monkeypatch.setattr(store_writer, "_FENCE_CHECK_S", 0.0)
    config = _config(corpus, tmp_path / "out.zarr")
    store = plan(config)
    shard = store.shards[0]
    claim = store.claim(shard)
    writer = store.writer(shard, claim=claim)
    # its renewals failed for a lifetime (storage unreachable); another run took the claim over
    Path(claim.path).write_text(json.dumps(locks._record("other-run", "extracting", 60)))
    rows = np.ones((2, *store.layers[0].shape), dtype=np.float32)
    with pytest.raises(locks.StoreBusyError, match="lost the lease .*now held by run other-run"):
        writer.write(0, ["a", "b"], np.ones(2, bool), {store.layers[0].name: rows})
        writer.commit()
    assert not store.is_committed(shard.name)
    claim.release()


def test_finalize_clears_what_killed_runs_left(corpus, tmp_path, monkeypatch):
    import fsspec

    out = tmp_path / "out.zarr"
    config = _config(corpus, out)
    run(config)
    monkeypatch.setattr(locks, "LEASE_SECONDS", 0.2)
    fs = fsspec.filesystem("file")
    dead = {**locks._record("killed-run", "extracting", 0.2), "expires_at": 0}
    for path in ("_locks/shards/shard-000001.json", "_runs/killed-run.json", "_locks/plan.json"):
        fs.pipe_file(str(out / path), json.dumps(dead).encode())
    live = locks.try_acquire(fs, str(out / "_locks/shards/shard-000002.json"), "extracting")
    (out / "_locks/shards/shard-000003.json.taken-0123456789abcdef").write_bytes(b"")
    (out / "_runs/.killed-run.json.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"{")
    time.sleep(2.5)  # over ten lifetimes: spent markers and temporary files go too
    FeatureStore.open(str(out)).finalize()
    assert json.loads((out / "_locks/shards/shard-000002.json").read_text())["run_id"] == live.run_id  # kept
    live.release()  # (its renewals' temporary files come and go)
    left = sorted(str(p.relative_to(out)) for d in ("_locks", "_runs") for p in (out / d).rglob("*") if p.is_file())
    # the markers of the leases taken over now (spent ten lifetimes from now)
    assert sorted(p.split(".taken-")[0] for p in left) == ["_locks/plan.json", "_locks/shards/shard-000001.json"]


_KILLS = {
    # after the arrays exist, before the store's generation is written: the plan is redone
    "plan": "from neuropredictor.store import metadata as M\n"
            "orig = M.create\n"
            "def patched(*a, **k):\n    orig(*a, **k); die()\n"
            "M.create = patched\n",
    # right after the second commit record
    "commit": "from neuropredictor.store.writer import ShardWriter as W\n"
              "orig = W.commit\nseen = []\n"
              "def patched(self, *a, **k):\n    r = orig(self, *a, **k); seen.append(1)\n"
              "    if len(seen) == 2: die()\n    return r\n"
              "W.commit = patched\n",
    # inside finalize, after the first boundary chunk was merged
    "finalize": "from neuropredictor.store.staging import Staging as S\n"
                "orig = S._merge_chunks\n"
                "def patched(self, *a, **k):\n    orig(self, *a, **k); die()\n"
                "S._merge_chunks = patched\n",
}


@pytest.mark.parametrize("point", sorted(_KILLS))
def test_killed_at_a_point_then_rerun_gives_the_identical_store(unequal_corpus, tmp_path, point):
    clean_url = str(tmp_path / "clean.zarr")
    run(_config(unequal_corpus, clean_url, batch_size=3))
    out = tmp_path / "out.zarr"
    cfg = _config(unequal_corpus, out, batch_size=3)
    proc = _spawn(_script(_KILLS[point] + "run(cfg)\n", lease_s=1.0), cfg, tmp_path)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    locks.LEASE_SECONDS, old = 1.0, locks.LEASE_SECONDS
    try:
        time.sleep(1.2)  # the dead run's leases expire
        manifest = run(cfg)
    finally:
        locks.LEASE_SECONDS = old
    assert manifest["status"] == "complete" and manifest["rows"]["valid"] == 25
    _assert_identical(clean_url, str(out))
    assert FeatureStore.open(str(out)).verify() == {}
    assert not list(out.glob("_staging/*"))


def test_a_lease_taken_over_after_it_expired_is_never_written_back(tmp_path, monkeypatch):
    # its holder's renewals failed for a whole lifetime, another run took it over: the holder's next
    # renewal rewrote it, and both ran as its only holder
    import fsspec

    fs, path = fsspec.filesystem("file"), str(tmp_path / "plan.json")
    monkeypatch.setattr(locks, "LEASE_SECONDS", 0.6)
    lease = locks.acquire(fs, path, "planning", wait_s=0)
    lease.check()  # its own, fresh
    taker = locks._record("other-run", "planning", 60)
    fs.pipe_file(path, json.dumps(taker).encode())  # what a takeover leaves
    with pytest.raises(locks.StoreBusyError, match="lost the lease"):
        lease.check()  # read now, not at the next renewal
    time.sleep(0.5)  # a renewal or two
    assert json.loads(fs.cat_file(path))["run_id"] == "other-run" and lease.lost
    with pytest.raises(locks.StoreBusyError, match="lost the lease .* now held by run other-run"):
        lease.check()
    lease.release()
    assert json.loads(fs.cat_file(path))["run_id"] == "other-run"  # not its lease to remove


def test_a_holder_that_finds_its_own_lease_expired_does_not_renew_it(tmp_path, monkeypatch):
    # a renewal read before a takeover and written after it would land on the taker's lease: a holder whose
    # lease is (nearly) expired counts it as lost instead
    import fsspec

    fs, path = fsspec.filesystem("file"), str(tmp_path / "plan.json")
    monkeypatch.setattr(locks, "LEASE_SECONDS", 0.6)
    lease = locks.acquire(fs, path, "planning", wait_s=0)
    fs.pipe_file(path, json.dumps({**locks._record(lease.run_id, "planning", 0.6), "expires_at": time.time()}).encode())
    time.sleep(0.5)
    assert lease.lost and locks.expired(json.loads(fs.cat_file(path)))
    lease.release()


def test_of_two_takers_of_an_expired_lease_one_holds_it(tmp_path):
    # B found the lease expired; A then took it over and holds a new one; B's takeover must not remove A's
    import fsspec

    fs, path = fsspec.filesystem("file"), str(tmp_path / "plan.json")
    fs.pipe_file(path, json.dumps({**locks._record("dead-run", "planning", 60), "expires_at": 0}).encode())
    raw, seen_by_b = locks._read_raw(fs, path)
    assert locks.expired(seen_by_b)
    a = locks.acquire(fs, path, "planning", wait_s=0)
    locks._take_over(fs, path, raw, 60)  # B, a moment late
    assert json.loads(fs.cat_file(path))["run_id"] == a.run_id
    with pytest.raises(locks.StoreBusyError, match="the store is busy"):
        locks.acquire(fs, path, "planning", wait_s=0)
    a.release()
    assert not fs.exists(path)


def test_a_conditional_put_that_conflicts_is_asked_again():
    # AWS answers one of two concurrent If-None-Match PUTs of a key with 409 ConditionalRequestConflict (to be
    # retried), not 412: s3fs raises it as a plain OSError, and a lease taken by many pods at once crashed
    from botocore.exceptions import ClientError
    from fsspec.implementations.memory import MemoryFileSystem
    from s3fs.errors import translate_boto_error

    from neuropredictor import fs as fsx

    class Conflicting(MemoryFileSystem):  # an object store whose first answers are the given S3 errors
        answers: list[str] = []

        def pipe_file(self, path, value, mode="overwrite", **kwargs):
            if self.answers:
                code = self.answers.pop(0)
                raise translate_boto_error(ClientError({"Error": {"Code": code, "Message": code}}, "PutObject"))
            return super().pipe_file(path, value, mode=mode, **kwargs)

    fs = Conflicting(skip_instance_cache=True)
    fs.store.clear()
    Conflicting.answers = ["ConditionalRequestConflict", "ConditionalRequestConflict"]
    assert fsx.create_exclusive(fs, "/bucket/lease.json", b"a") and fs.cat_file("/bucket/lease.json") == b"a"
    assert not fsx.create_exclusive(fs, "/bucket/lease.json", b"b")  # it exists: 412, as before
    Conflicting.answers = ["AccessDenied"]
    with pytest.raises(PermissionError):
        fsx.create_exclusive(fs, "/bucket/other.json", b"c")
    Conflicting.answers = ["ConditionalRequestConflict"] * 6  # a conflict that does not clear is raised
    with pytest.raises(OSError, match="ConditionalRequestConflict"):
        fsx.create_exclusive(fs, "/bucket/other.json", b"c")


def test_rows_waiting_for_finalize_are_counted_when_the_store_is_read(unequal_corpus, tmp_path, caplog):
    # a run killed before its finalize: inspect counted every committed row as written, open_features read many
    # of them as invalid (their boundary chunks not merged yet), and nothing said why
    import logging

    from neuropredictor import extract_shard, plan

    config = _config(unequal_corpus, tmp_path / "out.zarr", batch_size=3)
    store = plan(config)
    for shard in store.shards:
        extract_shard(config, shard, store=store)
    with caplog.at_level(logging.WARNING, logger="neuropredictor.store"):
        early = open_features(str(tmp_path / "out.zarr"))
    waiting = 25 - int(early["valid"].sum())
    assert waiting > 0 and f"{waiting} valid rows of committed shards lie in chunks shared" in caplog.text
    caplog.clear()
    store.finalize()
    with caplog.at_level(logging.WARNING, logger="neuropredictor.store"):
        assert int(open_features(str(tmp_path / "out.zarr"))["valid"].sum()) == 25
    assert "finalize" not in caplog.text
