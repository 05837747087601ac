"""One way to reach files: local disk, s3:// and any fsspec URL, for the corpus and the store alike.

Every part of the library opens its filesystems here, so credentials, cache rules and error messages
are the same everywhere. JSON and binary objects are written atomically: a reader sees the old object
or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import errno
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec

from neuropredictor.errors import NeuroPredictorError
from neuropredictor.redact import redact_text

log = logging.getLogger(__name__)

S3_CONNECTIONS = 64
"""Connections each S3 filesystem keeps open (botocore's default is 10); `config_kwargs` overrides it."""
S3_TRIES = 3  # botocore's tries per request, the first included; storage_options config_kwargs or AWS_MAX_ATTEMPTS /
# AWS_RETRY_MODE in the environment override it
S3FS_TRIES = 2  # s3fs's tries of a request that timed out or lost its connection (its `retries`)


def with_defaults(url: str, storage_options: Mapping | None) -> dict:
    """The storage options for url with ours under the caller's: every client we make of an S3 URL (ours,
    and zarr's for the chunks) keeps S3_CONNECTIONS connections, since botocore's 10 cap the concurrent
    reads of many small objects (a store's commit records, its chunks) at 10 round trips in flight; and
    reads a whole object in one GET (`max_concurrency` 1: above 1, s3fs asks each object's size first, a
    HEAD before every chunk and record read, to split big objects into parallel ranges).

    Tries per request: botocore's default (5, each waiting s3fs's 15 s read timeout) inside s3fs's own 5 made an
    endpoint that accepts connections and never answers (a hung server, a wrong port) fail after 7 minutes,
    silently. S3_TRIES botocore tries (its standard mode: also 500/503s and throttling, with backoff) inside
    S3FS_TRIES of s3fs's take about a minute and a half per read; the shard's own retries come on top. A write,
    which these timeouts do not bound (aiohttp times reads only), is cut off once it stops moving (s3http)."""
    opts = dict(storage_options or {})
    if fsspec.core.split_protocol(str(url))[0] in ("s3", "s3a"):
        from neuropredictor import s3http  # imports aiobotocore, which only S3 URLs need

        ours: dict[str, Any] = {"max_pool_connections": S3_CONNECTIONS, **s3http.config_options()}
        if not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):  # the user's, else ours
            ours["retries"] = {"total_max_attempts": S3_TRIES, "mode": "standard"}
        opts["config_kwargs"] = {**ours, **(opts.get("config_kwargs") or {})}
        opts.setdefault("max_concurrency", 1)
    return opts


def tuned(fs: Any) -> Any:
    """fs, with s3fs's own tries per request set to S3FS_TRIES (an attribute: s3fs takes no option for it)."""
    if type(fs).__module__.split(".")[0] == "s3fs":
        fs.retries = S3FS_TRIES
    return fs


def connect(url: str, storage_options: Mapping | None = None, *, fresh: bool = False,
            error: type[NeuroPredictorError] = NeuroPredictorError, what: str = "location") -> tuple[Any, str]:
    """(filesystem, path) for url; path has no trailing slash.

    fresh: bypass fsspec's instance cache (and its stale listings); needed after a fork, since async
    filesystems such as s3fs are not fork-safe. A URL whose protocol is unknown or whose backend is
    not installed raises `error`, naming the URL (credentials redacted) and the fix.
    """
    opts = with_defaults(url, storage_options)
    if fresh:
        opts["skip_instance_cache"] = True
    try:
        fs, path = fsspec.core.url_to_fs(str(url), **opts)
        tuned(fs)
    except (ImportError, ValueError, TypeError) as exc:
        raise error(f"cannot open {what} {redact_text(str(url))!r}: {exc}. Use a local path or an fsspec URL "
                    "(s3://bucket/prefix, file://...) and install the package for its protocol.") from exc
    return fs, path.rstrip("/") or path


def unreachable(url: str, exc: BaseException, what: str) -> str:
    """Why `what` at url could not be read or written, and what to check (credentials never shown)."""
    protocol = fsspec.core.split_protocol(str(url))[0] or "file"
    if protocol in ("file", "local"):
        check = "the path"
    elif protocol in ("s3", "s3a"):
        check = ("the path, the endpoint (AWS_ENDPOINT_URL or storage_options endpoint_url), the network and the "
                 "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or storage_options key/secret)")
    elif protocol in ("http", "https"):  # a server may answer 403 for a file it does not have
        check = "the URL (a 403 may mean it does not exist), its credentials, the server and the network"
    else:
        check = "the URL, the network and the credentials (storage_options)"
    cause = redact_text(str(exc))[:300]
    return f"cannot reach {what} {redact_text(str(url))}: {type(exc).__name__}: {cause}. Check {check}."


def permanent(exc: BaseException) -> bool:
    """An access error that retrying does not cure: a file where a folder should be, denied access, no
    credentials (a dropped connection or a timeout is not)."""
    return isinstance(exc, (NotADirectoryError, PermissionError)) or "Credentials" in type(exc).__name__


def throttled(exc: BaseException) -> bool:
    """Whether exc is an object store asking for fewer requests (S3's 503 SlowDown, which s3fs raises as EBUSY):
    the storage is there, and busy."""
    return getattr(exc, "errno", None) == errno.EBUSY or "SlowDown" in str(exc)


def outage(url: str, exc: BaseException, what: str) -> str | None:
    """Why `what` at url cannot be reached, when exc says it cannot (a storage failure, not a throttled request:
    the storage is there, and busy); else None."""
    return unreachable(url, exc, what) if storage_failure(exc) and not throttled(exc) else None


def storage_failure(exc: BaseException) -> bool:
    """Whether exc comes from the storage (a file system, an object store's client or connection) rather than
    from our own code: such an error is reported with `unreachable`."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp",
                                                                                "s3fs", "fsspec", "gcsfs", "adlfs")


def open_url(url: str, mode: str = "rb", storage_options: Mapping | None = None, *,
             error: type[NeuroPredictorError] = NeuroPredictorError) -> Any:
    """An open file at url (a context manager); a missing file raises `error` naming it. Writing creates the
    file's folder, as writing a store does."""
    fs, path = connect(url, storage_options, error=error, what="file")
    try:
        if "w" in mode and is_local(fs):
            fs.makedirs(parent(path) or ".", exist_ok=True)
        return fs.open(path, mode)
    except FileNotFoundError as exc:
        raise error(f"file not found: {redact_text(str(url))}") from exc


def check_creatable(url: str, storage_options: Mapping | None, *, error: type[NeuroPredictorError],
                    what: str) -> tuple[Any, str, bool]:
    """Fail early, writing nothing, when `what` cannot be created at url: its nearest existing ancestor must be
    a folder (on object stores, the bucket must exist). Returns (fs, path, whether url exists already)."""
    fs, path = connect(url, storage_options, error=error, what=what)
    try:
        probe = path
        for _ in range(64):  # bounded walk up to the nearest existing ancestor
            if fs.exists(probe):
                if not fs.isdir(probe):
                    raise error(f"cannot create {what} {redact_text(url)!r}: {probe!r} is a file, not a folder. "
                                "Choose another path.")
                return fs, path, probe == path
            parent_path = fs._parent(probe)
            if not parent_path or parent_path == probe:
                break
            probe = parent_path
        endpoint = _custom_endpoint(fs)
        raise error(f"cannot create {what} {redact_text(url)!r}: its bucket {probe!r} does not exist" + (
            f" at {endpoint}: create it, or check that this endpoint is the S3 API's address (MinIO: its API port, "
            "9000 by default, not its console's; AWS_ENDPOINT_URL or storage_options endpoint_url)" if endpoint
            else ": create it, or check its name"))
    except error:
        raise
    except Exception as exc:
        raise error(unreachable(url, exc, what)) from exc


def _custom_endpoint(fs: Any) -> str | None:
    """The endpoint an S3 filesystem talks to, when it is not AWS's own (MinIO, a lab's server), else None."""
    endpoint = getattr(getattr(getattr(fs, "s3", None), "meta", None), "endpoint_url", None)
    return redact_text(str(endpoint)) if endpoint and "amazonaws.com" not in str(endpoint) else None


def exists(url: str, storage_options: Mapping | None = None) -> bool:
    """Whether something is at url (False also when it cannot be reached)."""
    try:
        fs, path = connect(url, storage_options)
        return bool(fs.exists(path))
    except Exception:
        return False


def protocols(fs: Any) -> tuple[str, ...]:
    """The protocols a filesystem answers to (fsspec gives a name or a tuple of them)."""
    return tuple(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)


def is_local(fs: Any) -> bool:
    return "file" in protocols(fs) or "local" in protocols(fs)


def full_url(fs: Any, path: str) -> str:
    """A URL that opens path again from any process: the absolute path on local disk, proto://... otherwise."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def parent(path: str) -> str:
    path = path.rstrip("/")
    return path.rsplit("/", 1)[0] if "/" in path else ""


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def invalidate(fs: Any, path: str) -> None:
    # s3fs caches listings, while other workers (processes, machines) write under the same prefix
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def modified(info: dict) -> float | None:
    """A listed file's modification time (POSIX seconds): local disk's mtime, an object store's LastModified."""
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return value.timestamp() if hasattr(value, "timestamp") else (float(value) if value is not None else None)


def listing(fs: Any, path: str, recursive: bool = False) -> list[str]:
    """The paths in a folder (every file below it, with recursive), as they are now (not a cached listing);
    none when the folder does not exist."""
    invalidate(fs, path)
    try:
        return list(fs.find(path) if recursive else fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def remove_tree(fs: Any, path: str) -> None:
    invalidate(fs, path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)
    invalidate(fs, path)


def cat_small(fs: Any, path: str) -> bytes:
    """A small object's bytes in one GET on S3: s3fs's `cat_file` first asks for the object's size to read
    big objects in parallel parts (a HEAD, plus a LIST when the key is missing). FileNotFoundError if none."""
    kwargs = {"max_concurrency": 1} if getattr(fs, "max_concurrency", None) is not None else {}
    return fs.cat_file(path, **kwargs)


def in_parts(fs: Any) -> dict:
    """Options of a whole big file's copy (a shard fetched whole, an upload): in parallel parts on S3, as
    s3fs does by default (our clients read whole objects in one GET: `with_defaults`)."""
    return {"max_concurrency": S3_PARTS} if getattr(fs, "max_concurrency", None) is not None else {}


S3_PARTS = 10  # s3fs's own default


def read_json(fs: Any, path: str) -> tuple[dict | None, bool]:
    """(the JSON object at path or None, whether a file is there but damaged: not JSON, or not an object),
    in one GET on S3 (`cat_small`)."""
    try:
        obj = json.loads(cat_small(fs, path))
    except FileNotFoundError:
        return None, False
    except ValueError:
        return None, True
    return (obj, False) if isinstance(obj, dict) else (None, True)


def json_default(obj: Any) -> Any:
    # numpy scalars/arrays, sets and paths show up in configs and stats: write them as plain JSON values
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def json_bytes(obj: Any) -> bytes:
    """obj as indented UTF-8 JSON (what every JSON object of a store looks like)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False, default=json_default) + "\n").encode("utf-8")


def create_exclusive(fs: Any, path: str, data: bytes) -> bool:
    """Create path with data only if it does not exist yet, atomically; False if it exists.

    Local disk: a complete temporary file hard-linked into place (the link fails if the name exists).
    Object stores: a conditional PUT (If-None-Match), which AWS S3, MinIO and moto honour through s3fs. Two
    such PUTs at once may get 409 ConditionalRequestConflict on AWS instead of one 412; that one is asked
    again, as AWS says to. Other fsspec filesystems fall back to fsspec's check-then-write, which is not
    atomic.
    """
    if is_local(fs):
        try:
            _publish_local(fs, path, data, os.link)  # the link fails if the name exists
            return True
        except FileExistsError:
            return False
    for attempt in range(_CONFLICT_TRIES):
        try:
            fs.pipe_file(path, data, mode="create")
            break
        except FileExistsError:
            return False
        except OSError as exc:
            if attempt + 1 == _CONFLICT_TRIES or _error_code(exc) != "ConditionalRequestConflict":
                raise
            time.sleep(0.05 * 2**attempt * (1 + random.random()))
    invalidate(fs, path)
    return True


_CONFLICT_TRIES = 6


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs translated (botocore's ClientError is its cause)."""
    response = getattr(exc.__cause__, "response", None)
    return (response or {}).get("Error", {}).get("Code") if isinstance(response, dict) else None


_UNSYNCABLE = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EPERM, errno.EISDIR}
_unsynced_warned: set[str] = set()


def sync_local(paths: Iterable[str], root: str) -> None:
    """fsync local files, then every folder from theirs up to root: data that a record written next vouches for
    must be on the disk before it, or a power loss can keep the (fsynced) record and lose the data the kernel had
    not written back yet. A path that does not exist is skipped (zarr writes no chunk equal to its fill value), and
    so is one its filesystem cannot sync (some FUSE, 9p and network mounts refuse folders): warned once, since a
    power loss may then cost rows, and failing every commit would cost the run. In threads: on a disk with a
    slow flush, each waits for its own."""
    root = os.path.abspath(root)
    files = {os.path.abspath(p) for p in paths}
    folders: set[str] = set()
    for path in files:
        folder = os.path.dirname(path)
        for _ in range(64):  # bounded walk up to the root
            folders.add(folder)
            if folder == root or not folder.startswith(root + os.sep):
                break
            folder = os.path.dirname(folder)
    with ThreadPoolExecutor(8, thread_name_prefix="neuropredictor-sync") as pool:
        list(pool.map(_fsync, files))
        list(pool.map(_fsync, folders - files))


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    except OSError as exc:
        _cannot_sync(path, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        _cannot_sync(path, exc)
    finally:
        os.close(fd)


def _cannot_sync(path: str, exc: OSError) -> None:
    if exc.errno not in _UNSYNCABLE:
        raise exc
    device = str(os.stat(path).st_dev) if os.path.exists(path) else path
    if device not in _unsynced_warned:
        _unsynced_warned.add(device)
        log.warning("cannot sync %s to its disk (%s): on this filesystem a power loss or a crash of the machine may "
                    "cost rows of shards committed just before it (`inspect --verify` finds them)", path, exc)


def write_json_atomic(fs: Any, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, json_bytes(obj))


def write_bytes_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write data to path all at once; parent folders are made on local disk.

    Local disk: a temporary file in the same folder, fsync, os.replace. Object stores: one PUT
    (`pipe_file`), which is atomic per object there.
    """
    if is_local(fs):
        _publish_local(fs, path, data, os.replace)
    else:
        fs.pipe_file(path, data)


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.tmp$")  # `_publish_local`'s, below


def published_name(name: str) -> str:
    """The name a temporary file of `write_bytes_atomic` is being published as (other names as they are):
    a folder where another process writes `_plan.json` now holds `._plan.json.<hex>.tmp` for a moment."""
    m = _TEMPORARY.match(name)
    return m["name"] if m else name


def _publish_local(fs: Any, path: str, data: bytes, publish: Callable[[str, str], None]) -> None:
    """Write data, complete and fsynced, to a temporary file beside path, then publish(tmp, path) (os.replace
    or os.link); the temporary file never outlives the call."""
    path = fs._strip_protocol(path)
    directory = os.path.dirname(path)
    os.makedirs(directory or ".", exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
