"""Writing one shard: rows buffered into whole chunks, boundary chunks staged, then the commit record.

The writer owns the whole protocol of a shard's attempt: `FeatureStore.writer` withdraws an earlier
commit (each attempt stages into its own folder; finalize removes the others'), `write` takes rows in
order, `commit` flushes what is buffered (padding rows never written), checks that every staged object
exists and writes the commit record last.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from neuropredictor import fs as fsx
from neuropredictor.errors import StoreError
from neuropredictor.shard import Shard
from neuropredictor.store.layout import KEYS, VALID, LayerSpec, RowDigest, feature_path, local_chunk_files, local_root
from neuropredictor.store.records import Records
from neuropredictor.store.staging import Staging


_FENCE_CHECK_S = 2.0  # how often a writer re-reads the store's generation and its claim (tiny GETs)


class _ArrayBuffer:
    """Rows of one array waiting to be written, from global row `start` on (at most about a chunk)."""

    def __init__(self, array: Any, path: str, chunk_rows: int, fill: Any, dtype: Any, row_shape: tuple[int, ...],
                 start: int) -> None:
        self.array, self.path, self.chunk_rows = array, path, chunk_rows
        self.fill, self.dtype, self.row_shape = fill, dtype, row_shape
        self.parts: list[np.ndarray] = []
        self.start = start
        self.rows = 0
        self.digest = RowDigest()  # of every row of the shard, in order: what a later verify compares

    @property
    def end(self) -> int:
        return self.start + self.rows

    def append(self, data: np.ndarray) -> None:
        self.parts.append(data)
        self.rows += len(data)
        self.digest.update(data)

    def take(self, upto: int) -> np.ndarray:
        """Remove and return the buffered rows before global row `upto`."""
        data = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)
        n = upto - self.start
        head, rest = data[:n], data[n:]
        self.parts = [rest] if len(rest) else []
        self.start, self.rows = upto, len(rest)
        return head

    def fill_rows(self, n: int) -> np.ndarray:
        return np.full((n, *self.row_shape), self.fill, dtype=self.dtype)


def _nbytes(block: np.ndarray) -> int:
    if block.dtype.kind == "U":  # count keys as their UTF-8 size, not numpy's 4 bytes per character
        return int(sum(len(s.encode("utf-8")) for s in block.tolist()))
    return int(block.nbytes)


class ShardWriter:
    """Writes one shard's rows: whole chunks into the arrays, shared boundary chunks into staging.

    Get one from `FeatureStore.writer`; one writer per shard attempt, used from one thread.
    """

    def __init__(self, shard: Shard, arrays: Mapping[str, Any], layers: Sequence[LayerSpec], dtype: str,
                 chunk_rows: Mapping[str, int], total: int, staging: Staging, records: Records,
                 fence: Callable[[bool], None], exclusive_commit: bool = False) -> None:
        self._shard = shard
        self._offset, self._count = int(shard.offset), int(shard.count)
        self._end = self._offset + self._count
        self._total = total
        self._dtype = np.dtype(dtype)
        self._layers = list(layers)
        self._staging, self._records = staging, records
        # fence(full) raises once the store has been replaced or the shard's claim was lost: a stale writer
        # stops instead of writing into the new store, or over rows another run is writing now. Cheap each
        # write; full (reads) every _FENCE_CHECK_S and before the commit.
        self._fence = fence
        self._exclusive_commit = exclusive_commit  # the commit record only if none exists (a joining run)
        # this attempt's own staging folder, named in its commit record: a concurrent attempt at the same
        # shard (a relaunched worker while the first still runs) never touches it
        self.attempt = uuid.uuid4().hex[:16]
        self._checked_at = time.monotonic()
        self._next = 0
        self._closed = False
        self._committed: dict | None = None
        self._stats = {"rows": 0, "padded_rows": 0, "bytes": 0, "chunks": 0, "staged_objects": 0,
                       "valid": 0}  # valid: the rows stored with valid True (what finalize counts)
        # '<U' (fixed width) in memory: it saves to .npy without pickle; zarr stores it as vlen utf-8.
        kinds = {**{feature_path(lay.name): (np.nan, self._dtype, lay.shape) for lay in self._layers},
                 KEYS: ("", np.dtype("<U1"), ()), VALID: (False, np.dtype(bool), ())}
        self._buffers = {path: _ArrayBuffer(arrays[path], path, chunk_rows[path], *kind, self._offset)
                         for path, kind in kinds.items()}
        # on local disk, the files this attempt wrote, synced before its commit record (sync_local)
        self._local_root = local_root(next(iter(arrays.values())))
        self._written: list[str] = []

    def write(self, start: int, keys: Sequence[str], valid: np.ndarray, features: Mapping[str, Any]) -> None:
        """Rows [start, start+len(keys)) of this shard (start is the position within the shard).

        Calls come in increasing, contiguous order. Rows are buffered and written as whole chunks
        (never a partial write into a chunk another shard owns part of). Features are copied and cast
        to the store dtype (the caller may reuse its buffers); rows with valid False are stored as NaN.
        """
        name = self._shard.name
        if self._closed:
            raise StoreError(f"shard {name!r}: writer already closed")
        n = len(keys)
        if int(start) != self._next:
            raise StoreError(f"shard {name!r}: rows must come in order; expected start={self._next}, got {start}")
        if self._next + n > self._count:
            raise StoreError(f"shard {name!r}: rows {start}..{start + n} exceed its count {self._count}")
        valid = np.asarray(valid, dtype=bool).reshape(-1)
        if len(valid) != n:
            raise StoreError(f"shard {name!r}: {n} keys but {len(valid)} valid flags")
        expected = {lay.name for lay in self._layers}
        if set(features) != expected:
            missing, extra = sorted(expected - set(features)), sorted(set(features) - expected)
            raise StoreError(f"shard {name!r}: features do not match the store's layers "
                             f"(missing {missing}, unexpected {extra})")
        prepared: dict[str, np.ndarray] = {}
        for lay in self._layers:
            x = features[lay.name]
            if hasattr(x, "detach"):  # a torch tensor slipped through (maybe bfloat16, which numpy lacks)
                x = x.detach().float().cpu().numpy()
            source = x
            x = np.array(x, dtype=self._dtype, copy=True)  # a copy: the caller may reuse its buffer
            if x.shape != (n, *lay.shape):
                raise StoreError(f"shard {name!r}, layer {lay.name!r}: got shape {x.shape}, expected {(n, *lay.shape)}")
            _refuse_non_finite(name, lay.name, source, x, valid)
            if not valid.all():
                x[~valid] = np.nan  # an undecodable sample has no features
            prepared[feature_path(lay.name)] = x
        prepared[KEYS] = np.array([str(k) for k in keys], dtype=str) if n else np.zeros(0, "<U1")
        prepared[VALID] = valid.copy()
        for path, data in prepared.items():
            buf = self._buffers[path]
            buf.append(data)
            self._flush(buf, final=False)
        self._next += n
        self._stats["rows"] += n
        self._stats["valid"] += int(valid.sum())

    @property
    def rows(self) -> int:
        """Rows handed to the writer so far (its progress)."""
        return self._next

    def close(self) -> dict:
        """Write what is buffered, padding rows never written with fill (NaN, "", invalid), so a shard
        always ends with every one of its chunks rewritten; return the stats (rows, padded_rows, bytes,
        chunks, staged_objects). Does not commit."""
        if self._closed:
            return dict(self._stats, shard=self._shard.name)
        missing = self._count - self._next
        for buf in self._buffers.values():
            while buf.end < self._end:
                # pad one chunk at a time, so memory stays bounded by the chunk size
                step = min(self._end - buf.end, buf.chunk_rows - buf.end % buf.chunk_rows)
                buf.append(buf.fill_rows(step))
                self._flush(buf, final=False)
            self._flush(buf, final=True)
        self._stats["padded_rows"] = missing
        self._closed = True
        return dict(self._stats, shard=self._shard.name)

    def commit(self, record: Mapping | None = None) -> dict:
        """Close, check that every staged object exists, then write the commit record (after all of the
        data); returns the record as written. record: what the caller wants kept (see `Records`)."""
        if self._committed is not None:
            return self._committed
        stats = self.close()
        self._staging.check_complete(self._shard, self.attempt)
        if self._local_root is not None:
            fsx.sync_local(self._written, self._local_root)
        self._fence(True)
        checksums = {path: buf.digest.hexdigest() for path, buf in self._buffers.items()}
        self._committed = self._records.write_commit(
            self._shard, dict(record or {}, checksums=checksums, staging=self.attempt), stats,
            exclusive=self._exclusive_commit)
        return self._committed

    def _flush(self, buf: _ArrayBuffer, final: bool) -> None:
        c = buf.chunk_rows
        # Emit up to the last chunk boundary reached (or the shard's end): each chunk's part of this
        # shard then goes out in exactly one piece.
        upto = buf.end if (final or buf.end == self._end) else (buf.end // c) * c
        if upto <= buf.start:
            return
        full = time.monotonic() - self._checked_at > _FENCE_CHECK_S
        self._fence(full)
        if full:
            self._checked_at = time.monotonic()
        lo = buf.start
        data = buf.take(upto)
        own_lo = own_hi = None  # run of chunks entirely inside this shard, written with one call
        k = lo // c
        while k * c < upto:
            a, b = max(k * c, lo), min((k + 1) * c, upto)
            inside = k * c >= self._offset and min((k + 1) * c, self._total) <= self._end
            if inside:
                own_lo = a if own_lo is None else own_lo
                own_hi = b
            else:
                self._write_own(buf, data, lo, own_lo, own_hi)
                own_lo = own_hi = None
                block = data[a - lo:b - lo]
                self._staging.put(self._shard.name, buf.path, k, self.attempt, block)
                if self._local_root is not None:  # the piece itself was synced as it was written: its folder
                    self._written.append(fsx.parent(self._staging.path(self._shard.name, buf.path, k, self.attempt)))
                self._stats["staged_objects"] += 1
                self._stats["bytes"] += _nbytes(block)
            k += 1
        self._write_own(buf, data, lo, own_lo, own_hi)

    def _write_own(self, buf: _ArrayBuffer, data: np.ndarray, lo: int, a: int | None, b: int | None) -> None:
        if a is None or b is None:
            return
        block = data[a - lo:b - lo]
        buf.array[a:b] = block
        c = buf.chunk_rows
        self._written += local_chunk_files(buf.array, range(a // c, (b - 1) // c + 1))
        self._stats["chunks"] += (b - 1) // c - a // c + 1
        self._stats["bytes"] += _nbytes(block)


def _refuse_non_finite(shard: str, layer: str, source: np.ndarray, stored: np.ndarray, valid: np.ndarray) -> None:
    """StoreError if valid rows would hold NaN or inf, with nothing to say so (NaN marks invalid rows only):
    finite features beyond float16's range (65504) in a float16 store, or non-finite ones from the forward
    pass itself (fp16 autocast overflows in some networks). The rows are not copied out (a batch can be
    hundreds of MB): invalid ones are cleared from the mask instead."""
    bad = ~np.isfinite(stored)
    bad[~valid] = False
    if not bad.any():
        return
    where = f"shard {shard!r}, layer {layer!r}: {int(bad.sum())} feature value(s)"
    source = np.asarray(source)
    lost = np.isfinite(source) & bad
    if lost.any():
        raise StoreError(f"{where} up to {float(np.abs(source[lost]).max()):.4g} do not fit float16 (largest 65504). "
                         "Store float32 (dtype='float32'), or pick a reduction or layer with smaller values.")
    raise StoreError(f"{where} in valid rows are NaN or inf as the model computed them: with precision='fp16' "
                     "activations beyond 65504 overflow (use precision='bf16' or 'fp32'); otherwise the "
                     "network or its weights give them.")
