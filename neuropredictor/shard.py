"""A shard of a corpus and where its rows go: the one description shared by the corpus, the store and
the schedulers. Plain data, no torch: planning, merging and reading a store do not load a model stack."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shard:
    """One tar shard of a corpus and its rows in the corpus-wide arrays."""

    url: str  # full fsspec URL of the tar (absolute path for local files; s3://bucket/... otherwise)
    name: str  # file name without ".tar"; unique within a corpus; names commit records
    count: int  # samples in the shard
    offset: int  # global row of its first sample (sum of counts of earlier shards)
    # what the file was when the corpus was listed: its size and etag (or mtime, where there is no etag)
    # (not part of a shard's equality: two listings of one corpus give equal shards)
    size: int | None = field(default=None, compare=False)
    etag: str | None = field(default=None, compare=False)
    # its count was read from its tar headers, not taken from an index.json (a later listing may reuse it)
    scanned: bool = field(default=False, compare=False)

    @property
    def end(self) -> int:
        return self.offset + self.count
