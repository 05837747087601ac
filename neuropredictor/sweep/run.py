"""Running a sweep in this process: model after model (one replica per device at a time, released when the
next model loads), each extracted exactly as `extract` would, then scored as `encode` would, then compared.

A record of what finished with which options (`DIR/sweep.json`) lets a re-run skip finished models
without loading them; a half-done model resumes by shards (its store's commit records); a model that
fails is recorded with its error and the others still run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from neuropredictor import fs as fsx
from neuropredictor.config import IDENTITY, ExtractConfig
from neuropredictor.errors import Interrupted, NeuroPredictorError
from neuropredictor.redact import redact
from neuropredictor.status import StepStatus, StoreStatus
from neuropredictor.sweep import compare
from neuropredictor.sweep.config import SweepConfig, SweepModel, slug

log = logging.getLogger(__name__)

RECORD = "sweep.json"
# on_event(event, data): "model" {index, of, spec} before each model, "extracting" {spec} when its extraction
# runs (not when it is skipped), the extraction's own events ("planned", "batch", "shard"), then "model-done"
# with the model's entry of the summary.
ProgressFn = Callable[[str, dict], None]
# extract(config, on_event) -> the store's manifest; raises when the extraction fails
Extractor = Callable[[ExtractConfig, ProgressFn | None], dict]


class SweepFailed(NeuroPredictorError):
    """Some models of a sweep failed (the others completed); `summary` is the whole sweep's summary."""

    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__(failure_message(summary))
        self.summary = summary


class SweepRecord:
    """`DIR/sweep.json`: per model, the options its store and scores were made with, and how it ended."""

    def __init__(self, sweep: SweepConfig) -> None:
        self._fs, self._root = fsx.connect(sweep.out, sweep.storage_options, error=NeuroPredictorError,
                                           what="sweep folder")
        # damaged reads as none: everything is checked again (stores resume by their own records)
        self.models: dict[str, dict] = self._read()
        self._marked: set[str] = set()

    @property
    def path(self) -> str:
        return f"{self._root}/{RECORD}"

    def _read(self) -> dict[str, dict]:
        data, _damaged = fsx.read_json(self._fs, self.path)
        return dict((data or {}).get("models", {}))

    def save(self) -> None:
        """Write this run's entries over the record as it is now: another sweep into the same folder (other
        models) keeps its own entries."""
        self.models = {**self._read(), **{label: self.models[label] for label in self._marked}}
        fsx.write_json_atomic(self._fs, self.path, {"format": "neuropredictor-sweep/1", "models": self.models})

    def done(self, spec: str, step: str, options: dict) -> bool:
        entry = self.models.get(spec, {}).get(step)
        return bool(entry) and entry.get("options") == _written(options) and entry.get("status") == StepStatus.DONE

    def mark(self, spec: str, step: str, options: dict, status: str, **info: Any) -> None:
        self.models.setdefault(spec, {})[step] = {"options": _written(options), "status": status, **_written(info)}
        self._marked.add(spec)
        self.save()


def _written(options: dict) -> dict:
    """Options as the record keeps them: URLs without passwords or signed query values (option names such as
    `key_column` are not credentials: their values stay)."""
    return redact(options, names_are_data=True)


# encode(sweep, model, record) -> how the model's scoring ended; compare(sweep, scored models) -> the comparison
Scorer = Callable[[SweepConfig, SweepModel, SweepRecord], dict]
Comparer = Callable[[SweepConfig, list[SweepModel]], dict]


def _unchanged(config: ExtractConfig, config_hash: str | None) -> bool:
    """Whether the model's store is complete and holds what extracting it now would give, as far as that can
    be told without loading the model: it is the store the record names (by its config hash: not one
    extracted into the same place since, with other options), its plan's shards are the corpus's as listed
    now (names, counts, sizes and etags; no shard is read) and its weights have the checksum they were made
    with (of the weights file; of the loaded parameters, for a custom factory that loads its own), as has a
    custom model's file. When not, the model is extracted, which resumes, or refuses a changed corpus or
    model, exactly as `extract` would."""
    from neuropredictor.models import load_model, parse_spec
    from neuropredictor.models.base import STATE_DIGEST, weights_digest
    from neuropredictor.models.custom import code_digest
    from neuropredictor.pipeline.planning import corpus_shards
    from neuropredictor.store import FeatureStore

    try:
        store = FeatureStore.open(config.out, config.storage_options, mode="r")
        if store.manifest.get("status") != StoreStatus.COMPLETE or store.manifest.get("config_hash") != config_hash:
            return False
        listed = corpus_shards(config, known=lambda: store.shards)
        if [(s.name, s.count, s.size, s.etag) for s in listed] != [(s.name, s.count, s.size, s.etag)
                                                                   for s in store.shards]:
            return False
        code = store.config.get("code")  # a custom model's file: its code makes the numbers too
        if code is not None and code != code_digest(parse_spec(config.model)):
            return False
        made_with = str(store.config.get("weights"))
        if made_with.startswith(STATE_DIGEST):
            return load_model(config.model, pretrained=config.pretrained, weights=config.weights).weights == made_with
        return not config.weights or made_with == weights_digest(config.weights)
    except Exception:  # whatever keeps us from telling: extracting tells, and says why if it cannot
        return False


def _scoring_inputs(sweep: SweepConfig, model: SweepModel) -> dict[str, Any]:
    """What a model's scores were made from beyond their options: the store's rows (`content_id`: a store
    replaced, or a shard extracted again in place, are other rows), the neural data file as it is now (size
    and etag, or mtime) and how stimuli are split (models scored on other splits are not compared)."""
    from neuropredictor.corpus.listing import fingerprint
    from neuropredictor.encode.align import SPLIT_SCHEME
    from neuropredictor.store import FeatureStore

    try:
        content = FeatureStore.open(sweep.store_url(model), sweep.storage_options, mode="r").content_id()
        fs, path = fsx.connect(sweep.neural, sweep.storage_options)
        return {"store": content, "neural_file": list(fingerprint(fs.info(path))), "split_scheme": SPLIT_SCHEME}
    except Exception:  # unreadable: never taken for unchanged; scoring reports the problem
        return {"store": None}


_RECORDED = {*ExtractConfig.fields_with(IDENTITY), "corpus", "out"}


def extract_options(sweep: SweepConfig, model: SweepModel) -> dict:
    """The model's extraction options as the record keeps them: those that decide what its store holds (the
    others, such as batch size or devices, change how fast a run goes, and a store resumes with any)."""
    return sweep.extract_config(model).model_dump(mode="json", include=_RECORDED)


def is_extracted(sweep: SweepConfig, model: SweepModel, record: SweepRecord) -> bool:
    """Whether the model's store is complete and was made with the sweep's current options for it (then
    it is skipped without loading the model, but for a custom factory that loads its own weights). With
    `verify`, nothing is skipped: every store is read back."""
    if sweep.verify or not record.done(model.label, "extract", extract_options(sweep, model)):
        return False
    made = record.models[model.label]["extract"].get("info", {})
    return _unchanged(sweep.extract_config(model), made.get("config_hash"))


def record_extracted(sweep: SweepConfig, model: SweepModel, record: SweepRecord, manifest: dict,
                     seconds: float, since: datetime) -> dict[str, Any]:
    """A model extracted in `seconds` from `since` (UTC): its rate counts the rows committed in that time,
    not those a resumed store already held."""
    start = since.replace(microsecond=0)  # commit times have second precision
    rows_now = sum(int(s["count"]) for s in manifest["shards"]
                   if s.get("committed_at") and datetime.fromisoformat(s["committed_at"]) >= start)
    before = record.models.get(model.label, {}).get("extract", {}).get("info", {})
    info = {"rows": manifest["rows"], "layers": [lay["name"] for lay in manifest["layers"]],
            # a resume that found nothing to do keeps the rate of the run that extracted the rows
            "images_per_s": round(rows_now / seconds, 1) if seconds > 0 and rows_now else before.get("images_per_s"),
            "seconds": round(seconds, 2), "config_hash": manifest["config_hash"]}
    record.mark(model.label, "extract", extract_options(sweep, model), StepStatus.DONE, info=info)
    return {"status": StepStatus.DONE, "skipped": False, "rows_now": rows_now, **info}


def record_failed(sweep: SweepConfig, model: SweepModel, record: SweepRecord, error: str) -> dict[str, Any]:
    record.mark(model.label, "extract", extract_options(sweep, model), StepStatus.FAILED, error=error)
    return {"status": StepStatus.FAILED, "error": error}


def skipped(record: SweepRecord, model: SweepModel) -> dict[str, Any]:
    return {"status": StepStatus.DONE, "skipped": True, **record.models[model.label]["extract"].get("info", {})}


def extract_here(config: ExtractConfig, on_event: ProgressFn | None) -> dict[str, Any]:
    """The default way to extract one model: `neuropredictor.run` in this process; returns the manifest."""
    from neuropredictor.schedule import run

    return run(config, on_event=on_event)


def extract_model(sweep: SweepConfig, model: SweepModel, record: SweepRecord, on_event: ProgressFn | None = None,
                  extract: Extractor = extract_here) -> dict[str, Any]:
    """Extract one model of the sweep with `extract` (skipped when `is_extracted`); a failure is recorded."""
    if is_extracted(sweep, model, record):
        return skipped(record, model)
    if on_event:
        on_event("extracting", {"spec": model.label})
    t0, since = time.perf_counter(), datetime.now(timezone.utc)
    try:
        manifest = extract(sweep.extract_config(model), on_event)
    except Interrupted:
        raise
    except Exception as exc:  # one model's failure must not cost the others
        return record_failed(sweep, model, record, f"{type(exc).__name__}: {exc}")
    finally:  # its memory (a GPU's too) goes before it is scored and the next model loads
        from neuropredictor.pipeline import release_runners

        release_runners()
    return record_extracted(sweep, model, record, manifest, time.perf_counter() - t0, since)


def encode_model(sweep: SweepConfig, model: SweepModel, record: SweepRecord) -> dict[str, Any]:
    """Score one model's store against the neural data (skipped when done with the same options, for the same
    store and neural data file)."""
    from neuropredictor.encode import encode_command

    opts = sweep.encode_options(model)
    options = {**opts.model_dump(mode="json"), **_scoring_inputs(sweep, model)}
    if options["store"] is not None and record.done(model.label, "encode", options) \
            and fsx.exists(opts.out, sweep.storage_options):
        return {"status": StepStatus.DONE, "skipped": True, **record.models[model.label]["encode"].get("info", {})}
    try:
        summary = encode_command(opts, storage_options=sweep.storage_options)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        record.mark(model.label, "encode", options, StepStatus.FAILED, error=error)
        return {"status": StepStatus.FAILED, "error": error}
    info = {"scores": opts.out, "best_layer": summary["best_layer"]}
    record.mark(model.label, "encode", options, StepStatus.DONE, info=info)
    return {"status": StepStatus.DONE, "skipped": False, **info}


def compare_models(sweep: SweepConfig, done: list[SweepModel]) -> dict[str, Any]:
    """comparison.csv, comparison.png and the ranking per ROI, over the models whose scores exist."""
    table = compare.comparison_table({m.label: sweep.scores_url(m) for m in done}, sweep.storage_options)
    csv = compare.write_csv(table, sweep.comparison_url(".csv"), sweep.storage_options)
    png = compare.plot_comparison(table, sweep.comparison_url(".png"), sweep.storage_options)
    result = {"csv": csv, "plot": png, "ranking": compare.ranking(table)}
    if (warning := compare.unequal_stimuli(table)) is not None:
        log.warning("%s", warning)
        result["warning"] = warning
    return result


def model_entry(sweep: SweepConfig, model: SweepModel, record: SweepRecord, extracted: dict[str, Any],
                encode: Scorer = encode_model) -> dict[str, Any]:
    """One model's entry of the summary: how its extraction ended and, with neural data and a store, its scores."""
    entry: dict[str, Any] = {"model": model.label, "slug": slug(model.label), "store": sweep.store_url(model),
                             "extract": extracted}
    if sweep.neural is not None and extracted["status"] == StepStatus.DONE:
        entry["encode"] = encode(sweep, model, record)
    failed = any(entry.get(step, {}).get("status") == StepStatus.FAILED for step in ("extract", "encode"))
    entry["status"] = StepStatus.FAILED if failed else StepStatus.DONE
    return entry


def summarize(sweep: SweepConfig, entries: list[dict[str, Any]],
              compare: Comparer = compare_models) -> dict[str, Any]:
    """The sweep's summary from its models' entries: the comparison over the scored ones, the failed ones."""
    summary: dict[str, Any] = {"out": sweep.out, "models": entries}
    scored = [m for m, e in zip(sweep.models, entries) if e.get("encode", {}).get("status") == StepStatus.DONE]
    if scored:
        summary["comparison"] = compare(sweep, scored)
    elif sweep.neural is not None and fsx.exists(earlier := sweep.comparison_url(), sweep.storage_options):
        summary["earlier_comparison"] = earlier  # not this run's: no model was scored
    summary["failed"] = [e["model"] for e in entries if e["status"] == StepStatus.FAILED]
    return summary


def check_neural(sweep: SweepConfig) -> None:
    """Read the sweep's neural data before any model runs, and, where the corpus keys are known without reading
    images (a folder of images), match them: a file that cannot be read as asked, or keys that match no image,
    fail now rather than after the first model's extraction."""
    if sweep.neural is None or not sweep.models:
        return
    from neuropredictor.corpus.folder import folder_keys, is_image_folder
    from neuropredictor.encode import EncodingError
    from neuropredictor.encode._common import _fmt
    from neuropredictor.encode.align import KEYS_RULE, key_hint

    neural = sweep.encode_options(sweep.models[0]).read_neural(sweep.storage_options)
    if not is_image_folder(sweep.corpus):
        return  # a shard's keys are known once it is read
    keys = folder_keys(sweep.corpus)
    if not set(neural.keys) & set(keys):
        raise EncodingError(f"no stimulus key of the neural data ({len(neural.keys)} keys, e.g. {_fmt(neural.keys, 3)}) "
                            f"is an image of the corpus ({len(keys)} images, e.g. {_fmt(keys, 3)}); nothing was "
                            "extracted." + key_hint(keys, neural.keys) + KEYS_RULE)


def run_sweep(sweep: SweepConfig, on_event: ProgressFn | None = None, *, extract: Extractor = extract_here,
              encode: Scorer = encode_model,
              compare: Comparer = compare_models) -> dict[str, Any]:
    """Every model of the sweep, one after another, then the comparison; returns a summary (per model:
    status, store, rows, layers, images/s, error; with neural data: scores and the ranking per ROI). Failed
    models are listed in summary["failed"] (see `failure_message`); the others finish regardless. The steps
    are replaceable (the Prefect flow runs each as a subflow or a task of its own)."""
    emit = on_event or (lambda event, data: None)
    check_neural(sweep)
    record = SweepRecord(sweep)
    entries: list[dict[str, Any]] = []
    for i, model in enumerate(sweep.models):
        emit("model", {"index": i, "of": len(sweep.models), "spec": model.label})
        entries.append(model_entry(sweep, model, record, extract_model(sweep, model, record, on_event, extract),
                                   encode))
        emit("model-done", entries[-1])
    return summarize(sweep, entries, compare)


def failure_message(summary: dict[str, Any]) -> str:
    lines = [f"  {r['model']}: {(r.get('extract', {}).get('error') or r.get('encode', {}).get('error'))}"
             for r in summary["models"] if r["status"] == StepStatus.FAILED]
    n = len(summary["models"])
    how = "every model failed" if len(lines) == n else f"{len(lines)} of {n} models failed (the others are complete)"
    earlier = summary.get("earlier_comparison")
    note = f"\n(no model was scored this time: {earlier} is an earlier run's comparison)" if earlier else ""
    return (f"{how}; fix the cause and run the same sweep again: finished models are skipped.\n" + "\n".join(lines)
            + note)
