"""The boundary-chunk protocol, in one place.

Object stores have no locks and zarr takes none, so no two shard writers may write the same stored
object. Chunks run along the sample axis; a writer writes directly only the chunks that lie entirely
inside its shard's rows. Its rows of a chunk shared with a neighbouring shard (a "boundary chunk") go
to a small staged object of its own attempt, `_staging/<shard>/<attempt>/<array>/<chunk>.npy`; the
shard's commit record names the attempt, and finalize, the single writer of shared chunks, merges the
staged rows of each committed attempt into the real chunks. Two instances writing one shard at once (a
relaunched worker whose first instance still runs) thus never delete or overwrite each other's staged
rows. Chunk sizes are chosen so that equal-size shards share no chunk at all and stage nothing.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from neuropredictor import fs as fsx
from neuropredictor.errors import StoreError
from neuropredictor.shard import Shard
from neuropredictor.store.layout import (STAGING_DIR, boundary_chunks, local_chunk_files, local_root, row_nbytes,
                                         safe_name)

_MERGE_BATCH_BYTES = 256 * 2**20  # staged rows and chunks held in memory at once by finalize


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# np.load reads the .npy header with ast.literal_eval, which CPython 3.11 does not make thread-safe
# ("SystemError: AST constructor recursion depth mismatch" when finalize's threads parse at once)
_NPY_LOCK = threading.Lock()


def _npy_array(data: bytes) -> np.ndarray:
    with _NPY_LOCK:
        return np.load(io.BytesIO(data), allow_pickle=False)


class Staging:
    """Staged rows of boundary chunks, for a store whose arrays have `chunk_rows` and `total` rows."""

    def __init__(self, fs: Any, root: str, chunk_rows: dict[str, int], total: int) -> None:
        self._fs, self._root = fs, root
        self.chunk_rows, self.total = chunk_rows, total

    def folder(self, shard_name: str | None = None) -> str:
        base = f"{self._root}/{STAGING_DIR}"
        return base if shard_name is None else f"{base}/{safe_name(shard_name)}"

    def path(self, shard_name: str, array_path: str, chunk: int, attempt: str | None) -> str:
        # attempt None: a store written before attempts had folders of their own
        base = self.folder(shard_name) if attempt is None else f"{self.folder(shard_name)}/{attempt}"
        return f"{base}/{array_path}/{chunk}.npy"

    def boundary(self, shard: Shard, array_path: str) -> list[int]:
        return boundary_chunks(int(shard.offset), int(shard.count), self.chunk_rows[array_path], self.total)

    def expected(self, shard: Shard, attempt: str | None) -> list[str]:
        """The staged objects a complete write of this attempt at the shard leaves behind."""
        return [self.path(shard.name, path, k, attempt) for path in self.chunk_rows for k in self.boundary(shard, path)]

    def waiting_rows(self, shards: Sequence[Shard], committed: Mapping[str, str | None]) -> list[tuple[int, int]]:
        """Row ranges [lo, hi) of committed shards (name -> committed attempt) whose staged rows of some array
        still wait for finalize (one listing): that array holds fill there, or the rows of an earlier attempt at
        the shard, until it merges them; other arrays may already hold the new rows (each has its own chunks)."""
        fs = self._fs
        present = {fs._strip_protocol(p) for p in fsx.listing(fs, self.folder(), recursive=True)}
        if not present:
            return []
        return [(max(k * rows, s.offset), min((k + 1) * rows, s.end))
                for s in shards if s.name in committed for path, rows in self.chunk_rows.items()
                for k in self.boundary(s, path) if fs._strip_protocol(self.path(s.name, path, k, committed[s.name]))
                in present]

    def put(self, shard_name: str, array_path: str, chunk: int, attempt: str, block: np.ndarray) -> None:
        fsx.write_bytes_atomic(self._fs, self.path(shard_name, array_path, chunk, attempt), _npy_bytes(block))

    def check_complete(self, shard: Shard, attempt: str) -> None:
        """Raise unless every staged object of the attempt exists (before its commit record is written)."""
        expected = self.expected(shard, attempt)
        if not expected:
            return
        present = {self._fs._strip_protocol(p)
                   for p in fsx.listing(self._fs, f"{self.folder(shard.name)}/{attempt}", recursive=True)}
        missing = [p for p in expected if self._fs._strip_protocol(p) not in present]
        if missing:
            raise StoreError(f"shard {shard.name!r}: {len(missing)} staged boundary object(s) missing "
                             f"(e.g. {missing[0]}); write the shard again before committing it")

    def rows_as_stored(self, shard: Shard, array_path: str, arr: Any, attempt: str | None) -> np.ndarray:
        """The shard's rows of one array as a reader will see them after finalize: the array's rows, with
        the pieces of boundary chunks the committed attempt still has waiting in staging laid over them.
        The pieces are read first: one a finalize merges and deletes meanwhile is in the array read after."""
        pieces = {}
        for k in self.boundary(shard, array_path):
            with contextlib.suppress(FileNotFoundError):  # merged into the chunk already
                pieces[k] = _npy_array(self._fs.cat_file(self.path(shard.name, array_path, k, attempt)))
        rows = np.array(arr[shard.offset:shard.end])
        for k, piece in pieces.items():
            start = max(k * self.chunk_rows[array_path], shard.offset) - shard.offset
            rows[start:start + len(piece)] = piece
        return rows

    def merge(self, shards: Sequence[Shard], committed: Mapping[str, str | None],
              open_array: Callable[[str], Any]) -> list[str]:
        """Write the staged rows of committed shards (name -> committed attempt) into their boundary chunks,
        then delete the shards' staged rows (of every attempt); returns the shards merged. Rows merged by an
        earlier call are kept (a chunk is rebuilt from its current contents plus the new rows); rows of
        uncommitted shards stay staged."""
        fs = self._fs
        staging = self.folder()
        present = {fs._strip_protocol(p) for p in fsx.listing(fs, staging, recursive=True)}
        if not present:
            return []
        merged: set[str] = set()
        for path, rows in self.chunk_rows.items():
            # chunk -> the shards with rows in it, and the pieces still waiting there
            owners: dict[int, list[Shard]] = {}
            for s in shards:
                for k in self.boundary(s, path):
                    owners.setdefault(k, []).append(s)
            todo = []
            for k, members in sorted(owners.items()):
                pieces, merged_before = [], False
                for s in members:
                    if s.name not in committed:
                        continue
                    p = fs._strip_protocol(self.path(s.name, path, k, committed[s.name]))
                    if p in present:
                        pieces.append((max(k * rows, s.offset), p))
                        merged.add(s.name)
                    else:
                        merged_before = True  # committed, its piece merged and deleted by an earlier finalize
                if pieces:
                    todo.append((k, pieces, merged_before))
            if todo:
                arr = open_array(path)
                self._merge_chunks(arr, rows, todo)
                root = local_root(arr)
                if root is not None:  # the merged chunks on the disk before the pieces they hold are deleted
                    fsx.sync_local(local_chunk_files(arr, [k for k, _, _ in todo]), root)
        # every committed shard's staged rows go: its merged attempt's, and those of attempts that lost
        base = fs._strip_protocol(staging).rstrip("/") + "/"
        held = {p[len(base):].split("/", 1)[0] for p in present if p.startswith(base)}
        for name in sorted(n for n in committed if safe_name(n) in held):
            fsx.remove_tree(fs, self.folder(name))
        if merged and fsx.is_local(fs):
            try:  # only if empty: other shards may still have rows waiting
                fs.rmdir(staging)
            except OSError:
                pass
        return sorted(merged)

    def _merge_chunks(self, arr: Any, rows: int, todo: list[tuple[int, list[tuple[int, str]], bool]]) -> None:
        fs, total = self._fs, self.total
        group = max(1, _MERGE_BATCH_BYTES // (rows * max(1, row_nbytes(arr))))  # bounds the memory held at once
        for i in range(0, len(todo), group):
            batch = todo[i:i + group]
            blobs = {fs._strip_protocol(p): b for p, b in fs.cat([p for _, pcs, _ in batch for _, p in pcs]).items()}

            def merge_one(item: tuple[int, list[tuple[int, str]], bool]) -> None:
                k, pieces, merged_before = item
                lo, hi = k * rows, min((k + 1) * rows, total)
                # Start from fill unless rows merged by an earlier finalize live in this chunk; rows of
                # uncommitted shards are fill either way (their writers never touch shared chunks).
                # (arr.dtype: StringDType for keys, so any key length fits)
                chunk = np.array(arr[lo:hi]) if merged_before else np.full(
                    (hi - lo, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
                for start, p in pieces:
                    data = _npy_array(blobs[p])
                    chunk[start - lo:start - lo + len(data)] = data
                arr[lo:hi] = chunk  # one whole-chunk write

            with ThreadPoolExecutor(min(8, len(batch))) as pool:
                list(pool.map(merge_one, batch))
