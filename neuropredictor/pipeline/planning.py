"""Before anything is written: validate a run, then create its store or reopen it to resume."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable

from neuropredictor import fs as fsx
from neuropredictor.config import IDENTITY, ExtractConfig
from neuropredictor.corpus import list_shards
from neuropredictor.corpus.folder import is_image_folder, shards_for
from neuropredictor.corpus.listing import changed_since
from neuropredictor.errors import CorpusError, StoreError
from neuropredictor.pipeline.replicas import Runner, check_device, forget_self_loaded, get_runner
from neuropredictor.redact import redact_text
from neuropredictor.shard import Shard
from neuropredictor.store import FeatureStore
from neuropredictor.store.feature_store import plan_shards, refuse_foreign

log = logging.getLogger(__name__)


# How each IDENTITY field of the config enters the store's identity, resolved by the loaded replica
# (the checksum of a weights file, the layers a glob matched, each layer's reduction). pretrained and
# weights become one entry: what was loaded.
_RESOLVED = {
    "pretrained": lambda config, runner: ("weights", runner.model.weights),
    "weights": lambda config, runner: ("weights", runner.model.weights),
    "layers": lambda config, runner: ("layers", runner.extractor.layers),
    "reduce": lambda config, runner: ("reductions", {p.name: str(p.reduction) for p in runner.extractor.plan.values()}),
}


def identity(config: ExtractConfig, runner: Runner) -> dict:
    """The fields that determine the stored numbers (a store made with other values is another run), and
    the model's input size they imply."""
    out: dict = {}
    for name in ExtractConfig.fields_with(IDENTITY):
        key, value = _RESOLVED[name](config, runner) if name in _RESOLVED else (name, getattr(config, name))
        out[key] = value
        if name == "model":
            out["input_size"] = list(runner.model.input_size)
            if runner.model.code is not None:
                out["code"] = runner.model.code
    return out


def validate(config: ExtractConfig) -> list[Shard]:
    """Everything that can be checked before a store is touched: the model loads, the layers resolve,
    the reductions fit, the corpus is reachable and non-empty. Returns the corpus's shards (for a folder of
    images, the shards made of it beside the store: see corpus.folder)."""
    for device in config.resolved_devices():
        check_device(device)
    forget_self_loaded()
    get_runner(config)
    check_output(config.out, config.storage_options)  # before a folder of images is packed beside it
    shards = corpus_shards(config, known=lambda: planned_shards(config))
    if not any(s.count for s in shards):  # a store of 0 rows would report "complete" for nothing
        raise CorpusError(
            f"no images in the corpus {config.corpus!r}: its {len(shards)} shard(s) hold no samples. Check "
            "the shards (`tar tf SHARD`), or make them with `neuropredictor shards make`."
        )
    return shards


def corpus_shards(config: ExtractConfig, known: Callable[[], Iterable[Shard]]) -> list[Shard]:
    """The shards of the run's corpus, as listed now (for a folder of images, the shards made of it beside
    the store); unindexed shards counted before are counted from `known()` (see `list_shards`)."""
    corpus = config.corpus
    if is_image_folder(corpus):
        corpus = shards_for(corpus, config.out, config.storage_options)
    elif isinstance(corpus, list) and (folders := [c for c in corpus if is_image_folder(c)]):
        # keys are paths within a folder: two folders would give two stimuli one key
        raise CorpusError(
            f"{folders[0]!r} is a folder of images, and a folder of images must be the only corpus (given "
            f"{len(corpus)}): to extract several folders together, point the corpus at a folder that holds them "
            "(or symlinks to them); each image's key then starts with its folder's name.")
    return list_shards(corpus, config.storage_options, known=known)


def planned_shards(config: ExtractConfig) -> list[Shard]:
    """The shards the store at `out` was planned with, if there is one: a resume, or a child run of a
    distributed extraction, counts unindexed shards that have not changed from them instead of reading
    the whole corpus again to count its samples."""
    try:
        return plan_shards(config.out, config.storage_options)
    except Exception:  # a store we cannot read now: the shards are counted from their tars
        return []


def check_output(url: str, storage_options: dict | None = None) -> None:
    """Fail early, writing nothing, when the output cannot be created (`fs.check_creatable`), or an existing
    folder there is neither a store nor empty."""
    fs, path, exists = fsx.check_creatable(url, storage_options, error=StoreError, what="the output store")
    if exists:
        try:
            refuse_foreign(fs, path, url)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(fsx.unreachable(url, exc, "the output store")) from exc


def plan(config: ExtractConfig, shards: list[Shard] | None = None, scope: Collection[str] | None = None
         ) -> FeatureStore:
    """Validate, then create the store (or reopen it, to resume). `scope`: the shards this run extracts,
    where it is a child of a distributed run (their commit records only are read and checked; the parent
    checked the others).

    Fails fast with a NeuroPredictorError on an unknown model or layer, an unreachable or empty corpus,
    or an output that exists with a different configuration (nothing is written then).
    """
    shards = shards if shards is not None else validate(config)
    runner = get_runner(config)
    try:
        store = FeatureStore.create(
            config.out, shards, runner.layer_specs(), identity(config, runner), dtype=config.dtype,
            compression=config.compression, storage_options=config.storage_options, overwrite=config.overwrite,
        )
    except OSError as exc:  # a read-only folder, a full disk: name the store, not a line of zarr's code
        raise StoreError(f"cannot write the output store {redact_text(config.out)!r}: {type(exc).__name__}: "
                         f"{redact_text(str(exc))}. Choose an `out` you can write to, or fix its permissions "
                         "or free space.") from exc
    commits = store.committed(scope)  # read once, here, for the whole plan
    _refuse_changed_files(store, shards, config, commits)
    if config.verify:
        store.repair_metadata()
        store.withdraw(store.verify({name: r for name, r in commits.items() if name not in store.withdrawn}))
    store.committed_at_plan = frozenset(name for name in commits if name not in store.withdrawn)
    for line in plan_messages(store):
        log.warning("%s", line)
    return store


def plan_messages(store: FeatureStore) -> list[str]:
    """What the plan changed in the store, in words: what `overwrite=True` deleted, the zarr metadata
    `verify=True` wrote again, and the committed shards it took back, each with why (damaged, found by
    `verify=True`; or its file changed, with `overwrite=True`): they are extracted again."""
    out = []
    if replaced := store.replaced:
        kept = replaced.get("kept") or []
        out.append(f"overwrite=True replaced a store made with another configuration "
                   f"({replaced.get('committed_shards', 0)} of {replaced.get('shards', '?')} shards committed): "
                   f"deleted {', '.join(replaced.get('deleted', [])) or 'nothing'}"
                   + (f"; left alone: {', '.join(kept)}" if kept else ""))
    if rewritten := store.metadata_rewritten:
        out.append(f"{len(rewritten)} zarr metadata file(s) written again from the plan (the rows are kept, and "
                   "checked next): " + "; ".join(f"{path} ({why})" for path, why in sorted(rewritten.items())))
    if withdrawn := store.withdrawn:
        out.append(f"{len(withdrawn)} committed shard(s) are extracted again: "
                   + "; ".join(f"{name} ({why})" for name, why in sorted(withdrawn.items())))
    return out


def _refuse_changed_files(store: FeatureStore, shards: list[Shard], config: ExtractConfig,
                          commits: dict[str, dict]) -> None:
    """A committed shard whose file changed since its rows were extracted would leave the store mixing two
    versions of the corpus: refuse, naming the shards; with overwrite=True, extract those shards again."""
    changed = [s.name for s in shards if s.name in commits and "source" in commits[s.name]
               and changed_since(commits[s.name]["source"], s, config.storage_options)]
    if changed and config.overwrite:
        store.withdraw({name: "its shard file changed since its rows were extracted" for name in changed})
    elif changed:
        raise CorpusError(f"{len(changed)} shard(s) changed since their rows were extracted into "
                          f"{redact_text(store.url)!r}: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}. "
                          "The store would mix two versions of the corpus: restore the original files, or extract "
                          "them again (overwrite=True).")
