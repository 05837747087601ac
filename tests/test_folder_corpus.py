"""A folder of images as the corpus: shards made once beside the store, keys = relative paths, rows
identical to extracting `shards make`'s shards, reused when the folder is unchanged and remade (never
silently stale) when it changes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL, make_images

from neuropredictor import ExtractConfig, open_features
from neuropredictor.corpus import make_shards
from neuropredictor.corpus.folder import LISTING_NAME, is_image_folder, shard_folder
from neuropredictor.errors import NeuroPredictorError
from neuropredictor.schedule import run


def _config(corpus, out, **kw) -> ExtractConfig:
    return ExtractConfig(corpus=str(corpus), model=MODEL, layers=["layer2"], reduce="avgpool", out=str(out),
                         pretrained=False, batch_size=8, num_workers=0, **kw)


def _features(out: Path) -> tuple[list[str], np.ndarray]:
    ds = open_features(str(out))
    return [str(k) for k in ds["key"].values], ds["layer2"].values


def test_image_folder_extracts_like_its_shards(tmp_path: Path):
    images = tmp_path / "stimuli"
    paths = make_images(images, 14)  # nested folders, jpg/png/webp
    assert is_image_folder(images) and not is_image_folder(tmp_path / "missing")

    run(_config(images, tmp_path / "runs" / "a.zarr"))
    make_shards(images, str(tmp_path / "manual"), maxcount=1000)
    run(_config(tmp_path / "manual", tmp_path / "b.zarr"))

    keys, rows = _features(tmp_path / "runs" / "a.zarr")
    keys_b, rows_b = _features(tmp_path / "b.zarr")
    expected = sorted(p.relative_to(images).with_suffix("").as_posix() for p in paths)
    assert keys == expected == keys_b  # keys are the relative paths, in the order `shards make` gives
    np.testing.assert_array_equal(rows, rows_b)
    made = Path(shard_folder(images, str(tmp_path / "runs" / "a.zarr")))
    assert made.parent == tmp_path / "runs" and made.name.startswith("stimuli-")  # beside the store
    assert (made / LISTING_NAME).exists()


def test_unchanged_folder_reuses_its_shards_and_a_change_is_never_mixed_in(tmp_path: Path):
    images = tmp_path / "stimuli"
    make_images(images, 10)
    out = tmp_path / "f.zarr"
    run(_config(images, out))
    shards = Path(shard_folder(images, str(out)))
    tars = sorted(shards.glob("*.tar"))
    stamp = [t.stat().st_mtime_ns for t in tars]

    run(_config(images, out))  # resume of a complete store: shards reused as they are
    assert [t.stat().st_mtime_ns for t in tars] == stamp

    # one image replaced by another of the same name: the shards are remade, and the store that was
    # extracted from the old images refuses to mix the new one in
    victim = sorted(images.rglob("*.png"))[0]
    make_images(tmp_path / "other", 1, seed=99, nested=False)
    os.replace(next((tmp_path / "other").iterdir()), victim.with_suffix(".png"))
    os.utime(victim, ns=(1, 1))
    with pytest.raises(NeuroPredictorError, match="changed"):
        run(_config(images, out))
    assert [t.stat().st_mtime_ns for t in tars] != stamp

    run(_config(images, out, overwrite=True))  # the user's choice: extract the new folder
    keys, rows = _features(out)
    fresh = tmp_path / "fresh.zarr"
    make_shards(images, str(tmp_path / "again"))
    run(_config(tmp_path / "again", fresh))
    np.testing.assert_array_equal(rows, _features(fresh)[1])


def test_added_images_extend_the_corpus(tmp_path: Path):
    images = tmp_path / "stimuli"
    make_images(images, 6)
    out = tmp_path / "g.zarr"
    run(_config(images, out))
    make_images(images / "more", 3, seed=5, nested=False)
    with pytest.raises(NeuroPredictorError):  # a different corpus: the store says so, nothing is mixed
        run(_config(images, out))
    run(_config(images, out, overwrite=True))
    assert len(_features(out)[0]) == 9


def test_keys_shared_by_two_shard_folders_are_reported(tmp_path: Path):
    """Two stimulus sets packed apart, with the same file names, in one corpus: plan cannot see it (the
    shards are counted from their index.json), so finalize names the repeated keys and their rows."""
    import json

    from typer.testing import CliRunner

    from neuropredictor.cli import app

    for name in ("set1", "set2"):
        make_images(tmp_path / name, 3, seed=len(name), nested=False)
        make_shards(tmp_path / name, str(tmp_path / f"{name}-shards"), prefix=name)
    out = tmp_path / "f.zarr"
    manifest = run(ExtractConfig(corpus=[str(tmp_path / "set1-shards"), str(tmp_path / "set2-shards")], model=MODEL,
                                 layers=["layer2"], reduce="avgpool", out=str(out), pretrained=False, num_workers=0))
    assert manifest["duplicate_keys"] == {"count": 3, "examples": {"img0000": [0, 3], "img0001": [1, 4],
                                                                   "img0002": [2, 5]}}
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert "3 key(s) name more than one row" in shown.output and "'img0000' rows 0, 3" in shown.output
    assert json.loads(CliRunner().invoke(app, ["inspect", str(out), "--json"]).output)["duplicate_keys"]["count"] == 3


def test_a_folder_with_other_files_is_a_corpus_of_its_images(tmp_path: Path, caplog):
    # a Finder's .DS_Store or a notes file beside the images used to crash the check that the folder
    # holds images (TypeError); they are left out, and said so in the log
    images = tmp_path / "stimuli"
    make_images(images, 6)
    (images / ".DS_Store").write_bytes(b"\0\1")
    (images / "cat0" / "notes.txt").write_text("session 1")
    assert is_image_folder(images)
    manifest = run(_config(images, tmp_path / "a.zarr"))
    assert manifest["status"] == "complete" and manifest["rows"]["valid"] == 6
    assert ".DS_Store (hidden file)" in caplog.text and "cat0/notes.txt (not an image extension" in caplog.text


def test_a_folder_of_images_with_a_tar_in_it_is_refused(tmp_path: Path):
    # stimuli unpacked beside their archive: read as a folder of shards, its images were silently left out
    images = tmp_path / "stimuli"
    make_images(images, 6)
    make_shards(images / "cat0", str(tmp_path / "packed"), maxcount=10)
    (tmp_path / "packed" / "shard-000000.tar").rename(images / "backup.tar")
    with pytest.raises(NeuroPredictorError, match=r"both \.tar files \(backup\.tar\) and images"):
        run(_config(images, tmp_path / "a.zarr"))
    assert not (tmp_path / "a.zarr").exists()


def test_a_folder_of_unreadable_image_types_names_the_extensions_read(tmp_path: Path):
    # .heic and .jfif only: the error spoke of shards alone
    folder = tmp_path / "stimuli"
    folder.mkdir()
    (folder / "a.heic").write_bytes(b"\0" * 10)
    (folder / "b.jfif").write_bytes(b"\0" * 10)
    with pytest.raises(NeuroPredictorError, match=r"no images that can be read \(extensions jpg, jpeg, png"):
        run(_config(folder, tmp_path / "a.zarr"))


def test_an_output_that_is_not_a_store_is_refused_before_the_images_are_packed(tmp_path: Path):
    # the refusal came at plan, after the whole folder was copied into shards beside the output
    make_images(tmp_path / "stim", 4, nested=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(NeuroPredictorError, match=r"is not empty and holds no neuropredictor store \(todo.txt\)"):
        run(_config(tmp_path / "stim", tmp_path / "notes"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "stim"]


def test_a_store_inside_its_image_folder_works(tmp_path: Path):
    # its shards go beside the store, so inside the image folder: refused for a while as "into the image folder"
    make_images(tmp_path / "stim", 4, nested=False)
    manifest = run(_config(tmp_path / "stim", tmp_path / "stim" / "feats.zarr"))
    assert manifest["status"] == "complete" and manifest["rows"]["valid"] == 4
    assert run(_config(tmp_path / "stim", tmp_path / "stim" / "feats.zarr"))["rows"]["valid"] == 4  # resumes


def test_a_folder_of_images_among_several_corpora_is_refused_with_the_fix(tmp_path: Path):
    # was "no .tar shards in ./a, and no images that can be read", about a folder full of images
    make_images(tmp_path / "a", 3)
    make_images(tmp_path / "b", 3)
    config = _config(tmp_path / "a", tmp_path / "o.zarr").model_copy(update={"corpus": [str(tmp_path / "a"),
                                                                                         str(tmp_path / "b")]})
    with pytest.raises(NeuroPredictorError, match=r"a folder of images must be the only corpus \(given 2\).*holds "
                                                  r"them \(or symlinks to them\)"):
        run(config)
    assert not (tmp_path / "o.zarr").exists()
