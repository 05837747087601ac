"""neuropredictor.corpus: making, listing, counting and reading WebDataset shards (local and S3)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2 as T

from conftest import make_images
from neuropredictor.corpus import IMAGE_EXTENSIONS, Batch, Shard, index_shards, list_shards, make_shards, read_shard
from neuropredictor.corpus.folder import shards_for
from neuropredictor.errors import CorpusError


def small_transform() -> T.Compose:
    """Picklable (no lambdas): DataLoader workers receive it."""
    return T.Compose([T.Resize(16), T.CenterCrop(16), T.ToImage(), T.ToDtype(torch.float32, scale=True)])


class FailOnWidth:
    """A transform that raises for images of one width (a per-sample transform failure)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.inner = small_transform()

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.width == self.width:
            raise ValueError(f"width {self.width} not supported")
        return self.inner(img)


def image_files(root: Path) -> dict[str, Path]:
    """Expected key -> file for the images under root."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS:
            rel = p.relative_to(root).as_posix()
            out[rel.rsplit(".", 1)[0].replace(".", "_")] = p
    return out


def tar_members(src: str | Path | bytes) -> list[tuple[str, bytes]]:
    opened = tarfile.open(fileobj=io.BytesIO(src)) if isinstance(src, bytes) else tarfile.open(src)
    with opened as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def read_all(shard: Shard, transform=None, batch_size: int = 4, **kw) -> list[Batch]:
    return list(read_shard(shard, transform or small_transform(), batch_size, **kw))


# ------------------------------------------------------------------------------------------------
# make_shards


def test_make_shards_counts_index_and_members(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    shards = make_shards(image_dir, str(out), maxcount=10)

    assert [s.count for s in shards] == [10, 10, 5]
    assert [s.offset for s in shards] == [0, 10, 20]
    assert [s.name for s in shards] == ["shard-000000", "shard-000001", "shard-000002"]
    assert [s.url for s in shards] == [str(out / f"{s.name}.tar") for s in shards]
    assert sorted(p.name for p in out.iterdir()) == ["index.json"] + [
        f"shard-00000{i}.{ext}" for i in range(3) for ext in ("offsets.json", "tar")]

    index = json.loads((out / "index.json").read_text())
    assert index == {
        "format": "neuropredictor-shards/1",
        "shards": [{"name": f"shard-00000{i}", "count": c} for i, c in enumerate([10, 10, 5])],
        "total": 25,
    }

    expected = image_files(image_dir)
    keys_in_order = []
    for s in shards:
        members = tar_members(s.url)
        assert len(members) == 2 * s.count  # image + json, nothing else
        for (img_name, img_bytes), (meta_name, meta_bytes) in zip(members[::2], members[1::2]):
            key, ext = img_name.rsplit(".", 1)
            assert meta_name == f"{key}.json"
            assert "." not in key
            src = expected[key]
            assert ext == src.suffix[1:].lower()
            assert img_bytes == src.read_bytes()  # stored unmodified
            assert json.loads(meta_bytes) == {"path": src.relative_to(image_dir).as_posix()}
            keys_in_order.append(key)
    # sorted, deterministic walk; nested keys keep their "/"
    assert keys_in_order == sorted(expected, key=lambda k: k.split("/"))
    assert keys_in_order[0] == "cat0/img0000"


def _killed_at_shard(monkeypatch, n: int) -> None:
    """make_shards dies while writing its n-th shard (0-based), as under kill -9 or Ctrl-C."""
    import importlib

    make = importlib.import_module("neuropredictor.corpus.make")
    real, calls = make._write_tar, []

    def dying(f, items):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(1)
        return real(f, items)

    monkeypatch.setattr(make, "_write_tar", dying)


def test_a_killed_shards_make_leaves_a_folder_nobody_reads_until_it_is_completed(image_dir: Path, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    # review: a `shards make` killed midway left 61 of 100 shards and no index.json; extract counted them as the whole
    # corpus ("[complete]", 78 of 200 images missing, exit 0)
    out = tmp_path / "shards"
    with monkeypatch.context() as m:
        _killed_at_shard(m, 2)
        with pytest.raises(KeyboardInterrupt):
            make_shards(image_dir, str(out), maxcount=10)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    for reading in (list_shards, index_shards):
        with pytest.raises(CorpusError, match=r"shards is being packed by `neuropredictor shards make` \(started at "
                           r".* 3 shards\), or that run was killed: .* run the same `shards make` again"):
            reading(str(out))
    shards = make_shards(image_dir, str(out), maxcount=10)  # completes it: its identical shards are kept
    assert not (out / "_packing.json").exists() and list_shards(str(out)) == shards and len(shards) == 3


def test_a_make_under_way_beside_a_finished_one_leaves_the_folder_readable(image_dir: Path, tmp_path: Path) -> None:
    # the same command on two machines (or two runs of a folder corpus): each makes the same shards; the marker of
    # the one still packing must not make the other's finished folder unreadable, nor be removed by it
    out = tmp_path / "shards"
    shards = make_shards(image_dir, str(out), maxcount=10)
    other = {"token": "another-run", "host": "elsewhere", "pid": 1, "started_at": 0, "shards": 3}
    (out / "_packing.json").write_text(json.dumps(other))
    assert list_shards(str(out)) == shards  # its index.json says what the folder holds
    import importlib

    from neuropredictor import fs as fsx

    make = importlib.import_module("neuropredictor.corpus.make")
    make._unmark(fsx.connect(str(out))[0], str(out / "_packing.json"), "this-run")  # a run ending beside it
    assert json.loads((out / "_packing.json").read_text()) == other  # not this run's to remove
    (out / "index.json").unlink()
    with pytest.raises(CorpusError, match="is being packed"):
        list_shards(str(out))


def test_make_shards_is_deterministic_and_removes_stale_shards(image_dir: Path, tmp_path: Path) -> None:
    a = make_shards(image_dir, str(tmp_path / "a"), maxcount=10)
    b = make_shards(image_dir, str(tmp_path / "b"), maxcount=10)
    for sa, sb in zip(a, b, strict=True):
        assert Path(sa.url).read_bytes() == Path(sb.url).read_bytes()
    assert (tmp_path / "a/index.json").read_bytes() == (tmp_path / "b/index.json").read_bytes()

    # the same shards again: nothing to replace, allowed
    assert make_shards(image_dir, str(tmp_path / "a"), maxcount=10) == a
    # another corpus into the same folder (here: bigger shards) replaced and deleted the old one's shards,
    # whose stores could then never resume: refused before anything is touched, unless overwrite
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with pytest.raises(CorpusError, match=r"holds shards of another corpus \(shard-000002.offsets.json, "
                                          r"shard-000002.tar\) that this one \(2 shards\) would delete: pass "
                                          r"overwrite=True"):
        make_shards(image_dir, str(tmp_path / "a"), maxcount=20)
    make_images(tmp_path / "other", 25, nested=False)  # as many images, other keys: the same shard names
    with pytest.raises(CorpusError, match=r"shard-000000.tar holds other images than this run .* overwrite=True"):
        make_shards(tmp_path / "other", str(tmp_path / "a"), maxcount=10)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    with pytest.raises(CorpusError, match="into the image folder"):
        make_shards(image_dir, str(image_dir))
    assert [s.count for s in make_shards(image_dir, str(image_dir / "shards"), maxcount=10)] == [10, 10, 5]
    # with overwrite the third shard of the old run must not linger
    c = make_shards(image_dir, str(tmp_path / "a"), maxcount=20, overwrite=True)
    assert [s.count for s in c] == [20, 5]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["index.json"] + [  # stale sidecars go too
        f"shard-00000{i}.{ext}" for i in range(2) for ext in ("offsets.json", "tar")]
    assert [s.count for s in list_shards(str(tmp_path / "a"))] == [20, 5]


def test_webdataset_reads_the_shards(image_dir: Path, tmp_path: Path) -> None:
    shards = make_shards(image_dir, str(tmp_path / "shards"), maxcount=10)
    expected = image_files(image_dir)
    seen = {}
    for sample in wds.WebDataset([s.url for s in shards], shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
        seen[key] = sample[ext]
        assert json.loads(sample["json"])["path"] == expected[key].relative_to(image_dir).as_posix()
    assert seen.keys() == expected.keys()
    assert all(seen[k] == expected[k].read_bytes() for k in expected)


def test_make_shards_key_rules(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub.dir").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(src / "a.b.c.jpg")
    Image.new("RGB", (8, 8)).save(src / "sub.dir" / "UPPER.JPEG", format="JPEG")
    Image.new("RGB", (8, 8)).save(src / "x.png")
    (src / "notes.txt").write_text("not an image")
    (src / ".hidden.jpg").write_bytes(b"macOS resource fork")
    shards = make_shards(src, str(tmp_path / "out"))
    names = [n for n, _ in tar_members(shards[0].url)]
    assert names == ["a_b_c.jpg", "a_b_c.json", "sub_dir/UPPER.jpeg", "sub_dir/UPPER.json", "x.png", "x.json"]
    assert shards[0].count == 3


def test_make_shards_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(CorpusError, match="no images .*empty"):
        make_shards(empty, str(tmp_path / "out"))

    with pytest.raises(CorpusError, match="does not exist"):
        make_shards(tmp_path / "nope", str(tmp_path / "out"))

    dup = tmp_path / "dup"
    dup.mkdir()
    Image.new("RGB", (8, 8)).save(dup / "face.jpg")
    Image.new("RGB", (8, 8)).save(dup / "face.png")
    with pytest.raises(CorpusError, match=r"face\.jpg and face\.png"):
        make_shards(dup, str(tmp_path / "out"))

    cyc = tmp_path / "cycle"
    (cyc / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(cyc / "sub" / "a.jpg")
    (cyc / "sub" / "loop").symlink_to(cyc)  # a symlink cycle: walked once, not forever
    assert make_shards(cyc, str(tmp_path / "cyc-out"))[0].count == 1

    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (8, 8)).save(broken / "a.jpg")
    (broken / "b.jpg").symlink_to(tmp_path / "gone.jpg")  # crashed a folder run with a bare FileNotFoundError
    for make in (lambda: make_shards(broken, str(tmp_path / "broken-out")),
                 lambda: shards_for(broken, str(tmp_path / "runs" / "x.zarr"))):
        with pytest.raises(CorpusError, match=r"b\.jpg: it is a symbolic link to .*gone\.jpg, which does not exist"):
            make()

    # a symlink to a folder of the tree that sorts before it: the images keep their real paths as keys
    linked = tmp_path / "linked"
    (linked / "real").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(linked / "real" / "a.jpg")
    (linked / "alias").symlink_to(linked / "real")
    skipped: list = []
    (shard,) = make_shards(linked, str(tmp_path / "linked-out"), on_skip=lambda rel, why: skipped.append((rel, why)))
    with tarfile.open(shard.url) as tf:
        assert [n for n in tf.getnames() if n.endswith(".jpg")] == ["real/a.jpg"]
    assert skipped == [("alias/", "a symlink to real/, packed there")]
    # a link into a hidden folder of the tree is followed: the hidden folder itself is not packed
    (linked / ".data").mkdir()
    (linked / "real" / "a.jpg").rename(linked / ".data" / "a.jpg")
    (linked / "alias").unlink()
    (linked / "alias").symlink_to(linked / ".data")
    (shard,) = make_shards(linked, str(tmp_path / "hidden-out"))
    with tarfile.open(shard.url) as tf:
        assert [n for n in tf.getnames() if n.endswith(".jpg")] == ["alias/a.jpg"]

    dots = tmp_path / "dots"
    dots.mkdir()
    Image.new("RGB", (8, 8)).save(dots / "a.b.jpg")
    Image.new("RGB", (8, 8)).save(dots / "a_b.jpg")
    with pytest.raises(CorpusError, match="a_b"):
        make_shards(dots, str(tmp_path / "out"))


# ------------------------------------------------------------------------------------------------
# list_shards


@pytest.fixture
def shard_dir(image_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    make_shards(image_dir, str(out), maxcount=10)
    return out


def test_list_shards_forms(shard_dir: Path, tmp_path: Path) -> None:
    (shard_dir / "README.md").write_text("not a shard")
    ref = list_shards(str(shard_dir))
    assert [(s.name, s.count, s.offset) for s in ref] == [
        ("shard-000000", 10, 0),
        ("shard-000001", 10, 10),
        ("shard-000002", 5, 20),
    ]
    assert all(Path(s.url).is_absolute() and Path(s.url).is_file() for s in ref)

    assert list_shards(shard_dir) == ref  # a Path
    assert list_shards(str(shard_dir) + "/") == ref
    assert list_shards(f"file://{shard_dir}") == ref
    assert list_shards(str(shard_dir / "shard-{000000..000002}.tar")) == ref
    assert list_shards(str(shard_dir / "shard-*.tar")) == ref
    assert list_shards([s.url for s in ref]) == ref

    # order follows the list; offsets are cumulative in that order
    swapped = list_shards([str(shard_dir / "shard-000002.tar"), str(shard_dir / "shard-{000000..000001}.tar")])
    assert [(s.name, s.count, s.offset) for s in swapped] == [
        ("shard-000002", 5, 0),
        ("shard-000000", 10, 5),
        ("shard-000001", 10, 15),
    ]
    single = list_shards(str(shard_dir / "shard-000001.tar"))
    assert [(s.name, s.count, s.offset) for s in single] == [("shard-000001", 10, 0)]


def test_long_patterns_and_lists(image_dir: Path, tmp_path: Path) -> None:
    shards = make_shards(image_dir, str(tmp_path / "many"), maxcount=1)
    assert len(shards) == 25 and [s.offset for s in shards] == list(range(25))
    assert list_shards(str(tmp_path / "many/shard-{000000..000024}.tar")) == shards
    assert list_shards([s.url for s in shards]) == shards
    with pytest.raises(CorpusError, match="1 of 26 .*shard-000025.tar"):
        list_shards(str(tmp_path / "many/shard-{000000..000025}.tar"))
    with pytest.raises(CorpusError, match="shard-000030.tar does not exist"):
        list_shards([s.url for s in shards] + [str(tmp_path / "many/shard-000030.tar")])


def test_counts_from_headers_match_index(shard_dir: Path) -> None:
    from_index = list_shards(str(shard_dir))
    # make the index lie about one shard: proves the count above came from the index
    index = json.loads((shard_dir / "index.json").read_text())
    index["shards"] = index["shards"][:2]
    index["shards"][0]["count"] = 7
    (shard_dir / "index.json").write_text(json.dumps(index))
    partial = list_shards(str(shard_dir))
    assert [s.count for s in partial] == [7, 10, 5]  # third shard scanned

    (shard_dir / "index.json").unlink()
    scanned = list_shards(str(shard_dir))
    assert scanned == from_index


def test_header_count_groups_like_webdataset(tmp_path: Path) -> None:
    """Several fields per sample, nested keys, a __meta__ member, a directory entry, an undotted name."""
    path = tmp_path / "mixed.tar"
    members = [
        ("__index__", b"meta"),
        ("a/one.jpg", b"x"), ("a/one.cls", b"1"), ("a/one.seg.png", b"y"),
        ("a/two.jpg", b"x"),
        ("README", b"no dot: skipped"),
        ("b.c/three.json", b"{}"),
        ("b.c/three.JPG", b"x"),
        ("four.txt", b"t"),
    ]
    write_tar(path, members)
    with tarfile.open(path, "a") as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
    n_wds = sum(1 for _ in wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
    (shard,) = list_shards(str(path))
    assert shard.count == n_wds == 4

    batches = read_all(shard, batch_size=3)
    keys = [k for b in batches for k in b.keys]
    assert keys == ["a/one", "a/two", "b.c/three", "four"]
    valid = torch.cat([b.valid for b in batches]).tolist()
    assert valid == [False, False, False, False]  # the image bytes are garbage / missing
    errors = {k: v for b in batches for k, v in b.errors.items()}
    assert errors["a/one"].startswith("cannot decode image")
    assert errors["four"].startswith("no image member")


def test_list_shards_errors(shard_dir: Path, tmp_path: Path) -> None:
    missing_dir = tmp_path / "no-such-dir"
    with pytest.raises(CorpusError, match=f"{missing_dir}.*does not exist"):
        list_shards(str(missing_dir))

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(CorpusError, match=f"no .tar shards in {empty}"):
        list_shards(str(empty))

    with pytest.raises(CorpusError) as exc:
        list_shards(str(shard_dir / "shard-{000000..000009}.tar"))
    msg = str(exc.value)
    assert "7 of 10" in msg and "shard-000003.tar" in msg and "shard-000007.tar" in msg
    assert "shard-000008.tar" not in msg and "2 more" in msg  # at most 5 named

    with pytest.raises(CorpusError, match="index.json is not a .tar shard"):
        list_shards(str(shard_dir / "index.json"))

    with pytest.raises(CorpusError, match="does not exist"):
        list_shards(str(shard_dir / "shard-000099.tar"))

    with pytest.raises(CorpusError, match="named 'shard-000000'"):
        list_shards([str(shard_dir / "shard-000000.tar"), str(shard_dir)])

    with pytest.raises(CorpusError, match="empty"):
        list_shards([])
    with pytest.raises(CorpusError, match="empty"):
        list_shards("")

    with pytest.raises(CorpusError, match="matches no .tar"):
        list_shards(str(shard_dir / "other-*.tar"))

    # many names in one folder: checked against one listing instead of a request per shard
    with pytest.raises(CorpusError) as exc:
        list_shards(str(shard_dir / "shard-{000000..000019}.tar"))
    msg = str(exc.value)
    assert "17 of 20" in msg and "shard-000003.tar" in msg and "shard-000008.tar" not in msg and "12 more" in msg

    # a comma brace list is plain braceexpand too
    assert [s.name for s in list_shards(str(shard_dir / "shard-00000{0,2}.tar"))] == ["shard-000000", "shard-000002"]


def test_damaged_tars_are_errors_not_short_shards(shard_dir: Path, tmp_path: Path) -> None:
    data = (shard_dir / "shard-000000.tar").read_bytes()
    members = tar_members(shard_dir / "shard-000000.tar")

    # cut at a member boundary (no end-of-archive blocks): tarfile alone would read 4 samples quietly
    with tarfile.open(shard_dir / "shard-000000.tar") as tf:
        infos = tf.getmembers()
    cut = infos[8].offset  # header of the 5th sample's image
    trunc = tmp_path / "t1"
    trunc.mkdir()
    (trunc / "cut.tar").write_bytes(data[:cut])
    with pytest.raises(CorpusError, match="cut.tar is truncated"):
        list_shards(str(trunc))
    bad = Shard(url=str(trunc / "cut.tar"), name="cut", count=10, offset=0)
    with pytest.raises(CorpusError, match="cut.tar is truncated"):
        read_all(bad)

    # cut inside a member's data
    (trunc / "cut.tar").write_bytes(data[: cut - 700])
    with pytest.raises(CorpusError, match="cut.tar"):
        list_shards(str(trunc))

    # garbage over a header in the middle
    garbled = bytearray(data)
    garbled[cut : cut + 512] = bytes(range(256)) * 2
    (trunc / "cut.tar").write_bytes(bytes(garbled))
    with pytest.raises(CorpusError, match="cut.tar is truncated or corrupt.*invalid tar header"):
        list_shards(str(trunc))
    with pytest.raises(CorpusError, match="cut.tar"):
        read_all(bad, num_workers=2)

    # zeros over a header in the middle (reads as an early end-of-archive)
    zeroed = bytearray(data)
    zeroed[cut : cut + 512] = bytes(512)
    (trunc / "cut.tar").write_bytes(bytes(zeroed))
    with pytest.raises(CorpusError, match="cut.tar is corrupt: data follows an end-of-archive"):
        list_shards(str(trunc))

    # not a tar at all
    (trunc / "cut.tar").write_bytes(b"hello" * 100)
    with pytest.raises(CorpusError, match="cut.tar is not a readable tar"):
        list_shards(str(trunc))
    assert len(members) == 20

    # several damaged among good ones: every one named at once (the scan stopped at the first, so a folder of
    # thousands of remote shards was read whole again for each bad one)
    several = tmp_path / "several"
    several.mkdir()
    for i in range(4):
        (several / f"s{i}.tar").write_bytes(data)
    (several / "s1.tar").write_bytes(data[:cut])
    (several / "s3.tar").write_bytes(b"hello" * 100)
    for look in (list_shards, index_shards):
        with pytest.raises(CorpusError, match="2 of 4 shards cannot be read") as exc:
            look(str(several))
        assert "s1.tar is truncated" in str(exc.value) and "s3.tar is not a readable tar" in str(exc.value)


# ------------------------------------------------------------------------------------------------
# read_shard


def expected_tensor(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return small_transform()(img.convert("RGB"))


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_read_shard_order_and_values_with_and_without_workers(image_dir: Path, tmp_path: Path) -> None:
    (shard,) = make_shards(image_dir, str(tmp_path / "one"), maxcount=100)
    assert shard.count == 25
    files = image_files(image_dir)
    tar_keys = [n.rsplit(".", 1)[0] for n, _ in tar_members(shard.url)[::2]]

    runs = {nw: read_all(shard, batch_size=4, num_workers=nw) for nw in (0, 2)}
    for nw, batches in runs.items():
        assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 4, 1], nw
        assert torch.cat([b.index for b in batches]).tolist() == list(range(25))
        assert all(b.index.dtype == torch.int64 and b.valid.dtype == torch.bool for b in batches)
        assert [k for b in batches for k in b.keys] == tar_keys
        for b in batches:
            assert b.images.shape == (len(b), 3, 16, 16) and b.images.dtype == torch.float32
            assert b.valid.all() and b.errors == {}
            for key, img in zip(b.keys, b.images):
                assert torch.equal(img, expected_tensor(files[key]))
    for b0, b2 in zip(runs[0], runs[2], strict=True):
        assert b0.keys == b2.keys and torch.equal(b0.index, b2.index) and torch.equal(b0.images, b2.images)

    _signals_to_the_group_are_the_parents_and_its_exit_stops_the_workers(shard)

    # stopping early shuts the workers down without hanging
    it = read_shard(shard, small_transform(), 2, num_workers=2)
    assert next(it).index.tolist() == [0, 1]
    it.close()

    # more workers than batches, batch size larger than the shard
    (only,) = read_all(shard, batch_size=64, num_workers=2)
    assert only.index.tolist() == list(range(25))
    # three workers (more than this machine's cores: torch warns), batch size 1: every sample its own batch
    assert [int(b.index) for b in read_all(shard, batch_size=1, num_workers=3)] == list(range(25))


def _signals_to_the_group_are_the_parents_and_its_exit_stops_the_workers(shard: Shard) -> None:
    """A signal to the whole process group (Ctrl-C; a Prefect worker cancelling the run) is the parent's to act
    on: decode workers that died of it made the run record the shard failed and retry it. And a process that
    exits while its workers still run (a second Ctrl-C cut the loader's shutdown short) must not wait for them
    forever: workers that ignored SIGTERM held it at exit."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import json, os, signal, sys
        import torch
        from torchvision.transforms import v2 as T
        from neuropredictor.corpus import Shard, read_shard
        seen = []
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the parent acts on them (the CLI does)
            signal.signal(sig, lambda s, frame: seen.append(s))
        transform = T.Compose([T.Resize((16, 16)), T.PILToTensor(), T.ToDtype(torch.float32, scale=True)])
        shard = Shard(**json.loads(sys.argv[1]))
        it = read_shard(shard, transform, 2, num_workers=2)
        got = [next(it)]
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.killpg(0, sig)
        got += [next(it) for _ in range(5)]
        print(json.dumps({{"rows": torch.cat([b.index for b in got]).tolist(), "seen": sorted(seen)}}), flush=True)
        sys.exit(0)  # with the workers still running
        """)
    fields = {f.name: getattr(shard, f.name) for f in dataclasses.fields(shard)}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(fields)], capture_output=True, text=True,
                          timeout=120, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rows"] == list(range(12)) and len(out["seen"]) == 3


def test_bad_images_are_marked_invalid(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_images(src, 6, nested=False)  # img0000.jpg img0001.png img0002.webp img0003.jpg ...
    good = (src / "img0000.jpg").read_bytes()
    (src / "img0003.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (src / "img0004.png").write_bytes(b"")  # zero bytes
    (src / "img0005.webp").write_bytes(b"RIFF" + bytes(range(200)))  # garbage
    Image.new("RGB", (77, 20), "red").save(src / "img0006.png")  # decodes, but the transform refuses it
    (shard,) = make_shards(src, str(tmp_path / "out"))

    for nw in (0, 2):
        batches = read_all(shard, transform=FailOnWidth(77), batch_size=3, num_workers=nw)
        keys = [k for b in batches for k in b.keys]
        assert keys == [f"img{i:04d}" for i in range(7)]
        valid = dict(zip(keys, torch.cat([b.valid for b in batches]).tolist()))
        assert valid == {
            "img0000": True, "img0001": True, "img0002": True,
            "img0003": False, "img0004": False, "img0005": False, "img0006": False,
        }
        errors = {k: v for b in batches for k, v in b.errors.items()}
        assert set(errors) == {"img0003", "img0004", "img0005", "img0006"}
        assert errors["img0003"].startswith("cannot decode image:") and "truncated" in errors["img0003"]
        assert errors["img0004"].startswith("cannot decode image:")
        # PIL's words name its in-memory file ("<_io.BytesIO object at 0x7f..>"): left out, not "the image"
        assert errors["img0005"] == "cannot decode image: UnidentifiedImageError: cannot identify image file"
        assert errors["img0006"] == "transform failed: ValueError: width 77 not supported"
        images = torch.cat([b.images for b in batches])
        assert images.shape == (7, 3, 16, 16)
        assert images[3:].abs().sum() == 0  # invalid -> zeros
        assert torch.equal(images[0], expected_tensor(src / "img0000.jpg"))


def test_links_and_two_images_under_one_key_are_invalid_rows_that_say_why(tmp_path: Path) -> None:
    # GNU tar stores a hard-linked or symlinked image as a link member without data: its sample vanished
    # (no row, no reason); of two images under one key the first was used and the other lost, unreported
    make_images(tmp_path / "src", 3, nested=False)
    jpg, png = (tmp_path / "src" / "img0000.jpg").read_bytes(), (tmp_path / "src" / "img0001.png").read_bytes()
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "gnu-000000.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in (("a.jpg", jpg), ("c.jpg", jpg), ("e.jpg", jpg), ("e.png", png), ("f.png", png)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
            if name in ("a.jpg", "c.jpg"):  # a hard link b.jpg to a.jpg, a symlink d.jpg to c.jpg
                link = tarfile.TarInfo("b.jpg" if name == "a.jpg" else "d.jpg")
                link.type, link.linkname = (tarfile.LNKTYPE if name == "a.jpg" else tarfile.SYMTYPE), name
                tf.addfile(link)
    (shard,) = list_shards(str(tmp_path / "shards"))
    assert shard.count == 6
    for workers in (0, 2):
        batches = read_all(shard, batch_size=2, num_workers=workers)
        keys = [k for b in batches for k in b.keys]
        valid = dict(zip(keys, torch.cat([b.valid for b in batches]).tolist()))
        assert valid == {"a": True, "b": False, "c": True, "d": False, "e": False, "f": True}
        errors = {k: v for b in batches for k, v in b.errors.items()}
        assert "b.jpg is a link in the shard (to a.jpg)" in errors["b"] and "(to c.jpg)" in errors["d"]
        assert errors["e"].startswith("two images under the key e (jpg, png)")


def test_a_dotted_file_name_says_why_it_is_not_an_image(tmp_path: Path) -> None:
    # `stim_0.5.jpg` is key `stim_0`, field `5.jpg` by WebDataset's rule: the reason only listed the fields
    make_images(tmp_path / "src", 1, nested=False)
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "s-000000.tar", [("stim_0.5.jpg", (tmp_path / "src" / "img0000.jpg").read_bytes())])
    (batch,) = read_all(list_shards(str(tmp_path / "shards"))[0])
    assert batch.keys == ["stim_0"] and not batch.valid[0]
    assert batch.errors["stim_0"].endswith("so '5.jpg' is not an image field: name files without dots before the "
                                           "extension")


def test_macos_appledouble_members_are_not_samples(tmp_path: Path) -> None:
    # macOS tar adds "._x.jpg" (x.jpg's extended attributes) before x.jpg: each was a sample keyed "a/", and
    # the second one refused the whole shard for a repeated key
    make_images(tmp_path / "src", 2, nested=False)
    jpg = (tmp_path / "src" / "img0000.jpg").read_bytes()
    fork = b"\x00\x05\x16\x07" + bytes(60)  # AppleDouble magic, then a header
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "mac-000000.tar",
              [("a/._x.jpg", fork), ("a/x.jpg", jpg), ("a/._y.jpg", fork), ("a/y.jpg", jpg), ("._z.jpg", fork)])
    (shard,) = list_shards(str(tmp_path / "shards"))
    index_shards(str(tmp_path / "shards"))
    assert shard.count == 2 and list_shards(str(tmp_path / "shards"))[0].count == 2
    (batch,) = read_all(shard)
    assert batch.keys == ["a/x", "a/y"] and batch.valid.all()


def test_compressed_or_upper_case_tars_beside_the_shards_are_named(shard_dir: Path, tmp_path: Path) -> None:
    # a folder of shards read only its '.tar' files: a '.tar.gz' or '.TAR' beside them was left out, silently
    for extra in ("shard-000009.tar.gz", "SHARD-000009.TAR"):
        folder = tmp_path / extra
        folder.mkdir()
        for tar in shard_dir.glob("*.tar"):
            (folder / tar.name).write_bytes(tar.read_bytes())
        (folder / extra).write_bytes(b"x")
        for corpus in (str(folder), str(folder / "*")):
            with pytest.raises(CorpusError, match=rf"holds shards that would not be read: {extra}\. Shards are plain"):
                list_shards(corpus)


def test_count_mismatch_is_an_error(shard_dir: Path) -> None:
    shard = list_shards(str(shard_dir))[0]  # 10 samples
    # the fix is named: index the folder again, then overwrite the store planned with the old count
    with pytest.raises(CorpusError, match=r"has 10 samples but the corpus index says 11: .*shards index FOLDER.*"
                                          r"overwrite=True"):
        read_all(dataclasses.replace(shard, count=11), num_workers=2)

    # too few expected: nothing past the expected rows is ever yielded (they belong to the next shard)
    seen = []
    with pytest.raises(CorpusError, match="more than 9 samples"):
        for b in read_shard(dataclasses.replace(shard, count=9), small_transform(), 3, num_workers=2):
            seen.extend(b.index.tolist())
    assert seen and max(seen) < 9


def test_read_shard_missing_shard_and_bad_transform(shard_dir: Path) -> None:
    ghost = Shard(url=str(shard_dir / "gone.tar"), name="gone", count=3, offset=0)
    with pytest.raises(CorpusError, match="gone.tar does not exist"):
        read_all(ghost, num_workers=1)
    with pytest.raises(CorpusError, match="gone.tar does not exist"):
        read_all(ghost)
    shard = list_shards(str(shard_dir))[0]
    with pytest.raises(TypeError, match="must return a torch.Tensor"):
        read_all(shard, transform=T.Resize(8))


def test_empty_shard_reads_nothing(tmp_path: Path) -> None:
    write_tar(tmp_path / "empty.tar", [])
    (shard,) = list_shards(str(tmp_path / "empty.tar"))
    assert shard.count == 0
    assert read_all(shard, num_workers=2) == []


def test_pin_memory_batches(shard_dir: Path) -> None:
    shard = list_shards(str(shard_dir))[2]
    batches = read_all(shard, batch_size=2, num_workers=1, pin_memory=torch.cuda.is_available())
    assert [b.index.tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    if torch.cuda.is_available():
        assert all(b.images.is_pinned() and b.index.is_pinned() for b in batches)


# ------------------------------------------------------------------------------------------------
# S3 (moto server)


def test_s3_make_list_read_with_env_credentials(s3: dict, image_dir: Path) -> None:
    shards = make_shards(image_dir, "s3://test-bucket/corpus", maxcount=10)
    assert [s.url for s in shards] == [f"s3://test-bucket/corpus/shard-00000{i}.tar" for i in range(3)]

    listed = list_shards("s3://test-bucket/corpus")
    assert listed == shards
    with pytest.raises(CorpusError, match=r"s3://test-bucket/corpus/shard-000000.tar already exists \(shards on "
                                          r"object stores are not compared .* overwrite=True"):
        make_shards(image_dir, "s3://test-bucket/corpus", maxcount=10)  # remote shards are not compared
    assert list_shards("s3://test-bucket/corpus/shard-{000000..000002}.tar") == shards

    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3)
    index = json.loads(fs.cat_file("test-bucket/corpus/index.json"))
    assert index["total"] == 25
    fs.rm_file("test-bucket/corpus/index.json")
    assert list_shards("s3://test-bucket/corpus/") == shards  # counted from headers over S3

    files = image_files(image_dir)
    batches = read_all(listed[2], batch_size=2, num_workers=2)
    assert torch.cat([b.index for b in batches]).tolist() == list(range(5))
    for b in batches:
        assert b.valid.all()
        for key, img in zip(b.keys, b.images):
            assert torch.equal(img, expected_tensor(files[key]))


def test_s3_shards_make_killed_midway_is_refused_then_completed(s3: dict, image_dir: Path, monkeypatch) -> None:
    with monkeypatch.context() as m:
        _killed_at_shard(m, 1)
        with pytest.raises(KeyboardInterrupt):
            make_shards(image_dir, "s3://test-bucket/corpus", maxcount=10)
    with pytest.raises(CorpusError, match=r"s3://test-bucket/corpus is being packed"):
        list_shards("s3://test-bucket/corpus")
    with pytest.raises(CorpusError, match=r"is being packed"):  # one shard named: its folder is checked too
        list_shards("s3://test-bucket/corpus/shard-000000.tar")
    with pytest.raises(CorpusError, match="already exists"):  # remote shards are not compared: as the refusal says,
        make_shards(image_dir, "s3://test-bucket/corpus", maxcount=10)
    shards = make_shards(image_dir, "s3://test-bucket/corpus", maxcount=10, overwrite=True)  # --overwrite completes it
    assert list_shards("s3://test-bucket/corpus") == shards and len(shards) == 3


def test_s3_with_explicit_storage_options(s3: dict, image_dir: Path, monkeypatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var)
    shards = make_shards(image_dir, "s3://test-bucket/c2", maxcount=20, storage_options=s3)
    listed = list_shards(["s3://test-bucket/c2/shard-000001.tar", "s3://test-bucket/c2/shard-000000.tar"], storage_options=s3)
    assert [(s.name, s.count, s.offset) for s in listed] == [("shard-000001", 5, 0), ("shard-000000", 20, 5)]
    for nw in (0, 2):
        batches = read_all(shards[1], batch_size=2, num_workers=nw, storage_options=s3)
        assert [k for b in batches for k in b.keys] == [
            n.rsplit(".", 1)[0] for n, _ in tar_members(_s3_bytes(s3, shards[1].url))[::2]
        ]
        assert all(b.valid.all() for b in batches)


def _s3_bytes(opts: dict, url: str) -> bytes:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **opts).cat_file(url)


def test_an_s3_endpoint_that_never_answers_fails_in_bounded_time() -> None:
    # review: an endpoint that accepts connections and never answers (a hung server, a wrong port) failed after
    # 427 s, silently: botocore's 5 tries inside s3fs's 5. Here with a 1 s read timeout: 3 x 2 tries per request
    # (72 s before)
    import socket
    import time

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(128)  # connections are accepted by the kernel, and nothing is ever read or answered
    try:
        opts = {"endpoint_url": f"http://127.0.0.1:{hung.getsockname()[1]}", "key": "k", "secret": "s",
                "config_kwargs": {"read_timeout": 1, "connect_timeout": 1}}
        t0 = time.monotonic()
        with pytest.raises(CorpusError, match=r"ReadTimeout|timed out|Timeout"):
            list_shards("s3://bucket/corpus", storage_options=opts)
        assert time.monotonic() - t0 < 40
    finally:
        hung.close()


def _upload(endpoint: str, size: int, read_timeout: float) -> list:
    """pipe_file of `size` bytes through our S3 client, in a thread; what ended it, or [] while it runs."""
    from neuropredictor import fs as fsx

    outcome: list = []

    def upload() -> None:
        opts = {"endpoint_url": endpoint, "key": "k", "secret": "s",
                "config_kwargs": {"read_timeout": read_timeout, "connect_timeout": 1}}
        fs, path = fsx.connect("s3://bucket/store", opts, fresh=True)
        try:
            fs.pipe_file(f"{path}/chunk", b"x" * size)
            outcome.append("written")
        except Exception as exc:  # noqa: BLE001 - what ended it is the assertion
            outcome.append(exc)

    worker = threading.Thread(target=upload, daemon=True)
    worker.start()
    worker.join(120)
    return outcome


@pytest.mark.parametrize("size", [100, 4 * 2**20])
def test_an_upload_to_an_s3_endpoint_that_never_answers_fails_in_bounded_time(size: int) -> None:
    # review: a write waited for ever (aiohttp times reads only): a small one for the server's "100 Continue", a big
    # one for room in the full socket buffer, and a run writing to a hung endpoint hung instead of failing
    import socket

    import botocore.exceptions

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(128)
    try:
        outcome = _upload(f"http://127.0.0.1:{hung.getsockname()[1]}", size, read_timeout=1)
        assert outcome, "the upload still waits after 120 s"
        assert isinstance(outcome[0], botocore.exceptions.ReadTimeoutError), outcome
    finally:
        hung.close()


def test_an_https_upload_to_an_s3_endpoint_that_never_answers_fails_in_bounded_time(tmp_path: Path, monkeypatch,
                                                                                     caplog) -> None:
    # review: over HTTPS botocore sends a PUT's body aws-chunked (its checksum after the data), which the first
    # watchdog did not look at: an upload to a hung AWS-like endpoint still waited for ever
    import datetime
    import ipaddress
    import socket
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from neuropredictor import s3http

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list = []

    def serve() -> None:  # the handshake, then nothing is ever read or answered
        for _ in range(20):
            with contextlib.suppress(OSError):
                held.append(tls.wrap_socket(server.accept()[0], server_side=True))

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setattr(s3http, "_CHUNK_WAIT_S", 1.0)  # seconds, not the real half minute
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "cert.pem"))
    try:
        with caplog.at_level("WARNING", logger="neuropredictor.s3http"):
            outcome = _upload(f"https://127.0.0.1:{server.getsockname()[1]}", 100, read_timeout=1)
        assert outcome and type(outcome[0]).__name__ == "ReadTimeoutError", outcome
        assert any("took no bytes for 3 s" in r.message for r in caplog.records)  # the aws-chunked body's wait
    finally:
        server.close()
        for conn in held:
            conn.close()


def test_a_slow_upload_that_keeps_moving_is_not_cut_off() -> None:
    # review: a deadline from the upload's size cut off slow links (ten uploads at once on a 10 Mbit/s uplink);
    # only an upload that stops moving is: this one takes over twice the connect and read timeouts together
    import socket

    size = 24 * 2**20
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            head, body = head.split(b"\r\n\r\n", 1)
            if b"100-continue" in head.lower():
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            got = len(body)
            while got < size:  # the first half at about 1.3 MB/s, a slow link; then at once (not the socket
                got += len(conn.recv(65536))  # buffers' tail, which aiohttp's own read timeout bounds)
                time.sleep(0.05 if got < size // 2 else 0)
            conn.sendall(b'HTTP/1.1 200 OK\r\nETag: "e"\r\nContent-Length: 0\r\n\r\n')

    threading.Thread(target=serve, daemon=True).start()
    try:
        t0 = time.monotonic()
        outcome = _upload(f"http://127.0.0.1:{server.getsockname()[1]}", size, read_timeout=3)
        assert outcome == ["written"] and time.monotonic() - t0 > 2 * (1 + 3), outcome
    finally:
        server.close()


def test_s3_errors(s3: dict, image_dir: Path) -> None:
    with pytest.raises(CorpusError, match="s3://no-such-bucket/corpus does not exist"):
        list_shards("s3://no-such-bucket/corpus")
    make_shards(image_dir, "s3://test-bucket/corpus", maxcount=10)
    with pytest.raises(CorpusError, match=r"1 of 4 .*s3://test-bucket/corpus/shard-000003.tar"):
        list_shards("s3://test-bucket/corpus/shard-{000000..000003}.tar")
    with pytest.raises(CorpusError, match=r"17 of 20 .*s3://test-bucket/corpus/shard-000003.tar"):
        list_shards("s3://test-bucket/corpus/shard-{000000..000019}.tar")
    with pytest.raises(CorpusError, match="s3://test-bucket/other does not exist"):
        list_shards("s3://test-bucket/other")


def test_http_shards_missing_or_unreachable_are_told_apart_without_credentials(image_dir: Path, tmp_path: Path) -> None:
    # explorer: a brace pattern of http:// shards behind a refused connection said they "do not exist", and
    # printed the URL's password
    import functools
    import socket
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    make_shards(image_dir, str(tmp_path / "web"), maxcount=10)  # 3 shards
    quiet = type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(tmp_path / "web")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    try:
        base = f"http://alice:SuperSecret987@127.0.0.1:{server.server_address[1]}"
        assert [s.count for s in list_shards(f"{base}/shard-{{000000..000002}}.tar")] == [10, 10, 5]
        missing = r"2 of 5 shards of the pattern .*do not exist: .*shard-000003.tar"
        with pytest.raises(CorpusError, match=missing) as lost:
            list_shards(f"{base}/shard-{{000000..000004}}.tar")
        with pytest.raises(CorpusError, match=r"cannot reach corpus .*127.0.0.1:\d+/train-000000.tar.*Connect") as cut:
            list_shards(f"http://alice:SuperSecret987@127.0.0.1:{closed}/train-{{000000..000003}}.tar")
        assert "SuperSecret987" not in str(lost.value) + str(cut.value)
    finally:
        server.shutdown()


def test_unreachable_endpoint(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = {
        "endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s",
        "config_kwargs": {"retries": {"max_attempts": 1}},  # fail fast: the test is about the message
    }
    with pytest.raises(CorpusError, match="cannot reach corpus s3://bucket/corpus.*endpoint") as exc:
        list_shards("s3://bucket/corpus", storage_options=opts)
    assert "\"s\"" not in str(exc.value) and "'s'" not in str(exc.value)  # no secrets in messages
