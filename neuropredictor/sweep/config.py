"""What a sweep is: many models over one stimulus set, each into its own ordinary store, optionally scored
against neural data. `SweepConfig` takes the run options it shares with `ExtractConfig` (and the encoding
options it shares with `EncodeOptions`) from their one home.

    DIR/<slug>.zarr          each model's features: the store `extract` would write for the same options
    DIR/<slug>-scores.zarr   its encoding scores (with `neural`)
    DIR/comparison.csv/.png  every model x layer x ROI, and the models ranked per ROI
    DIR/sweep.json           what ran with which options: a re-run skips what is finished
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from neuropredictor.config import ExtractConfig, Names, comma_list, fields_of, path_text
from neuropredictor.encode.options import EncodeOptions
from neuropredictor.errors import ModelSpecError

SCORES_SUFFIX = "-scores"  # DIR/<slug>-scores.zarr
_PER_MODEL = ("layers", "reduce", "pretrained", "weights")  # what a model may set for itself


def slug(label: str) -> str:
    """A model's label (its spec, or its name) as a file name: every character outside [A-Za-z0-9._-] becomes `_`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", label)


class SweepModel(BaseModel):
    """One model of a sweep, with what it sets for itself (None: the sweep's setting)."""

    model_config = ConfigDict(extra="forbid")

    spec: str = Field(description=ExtractConfig.model_fields["model"].description)
    name: str | None = Field(None, min_length=1, description="The model's name in the sweep: its store's and "
                             "scores' file names, its record and its row in the comparison (default: the spec). "
                             "Name each entry to run one architecture more than once, e.g. two checkpoints.")
    layers: Names | None = Field(None, description="This model's layers (default: the sweep's `layers`).")
    reduce: str | None = Field(None, description="This model's reduction (default: the sweep's `reduce`).")
    pretrained: bool | None = Field(None, description="Pretrained weights for this model (default: the sweep's).")
    weights: str | None = Field(None, description=ExtractConfig.model_fields["weights"].description)

    _split = field_validator("layers", mode="before")(comma_list)

    @field_validator("spec")
    @classmethod
    def _grammar(cls, v: str) -> str:
        """A malformed spec is refused with the sweep, not found after the models before it ran for hours."""
        from neuropredictor.models.spec import parse_spec

        try:
            parse_spec(v)
        except ModelSpecError as exc:
            raise ValueError(str(exc).split("\n")[0]) from None
        return v

    @property
    def label(self) -> str:
        """What names the model in the sweep: `name`, else its spec."""
        return self.name or self.spec


# How every model is scored and the neural data read: EncodeOptions without what the sweep sets per model.
EncodeSettings = create_model("EncodeSettings", __config__=ConfigDict(extra="forbid"),
                              __doc__="Encoding options of a sweep: how the neural data is read and every layer scored.",
                              **fields_of(EncodeOptions, ("features", "neural", "out", "plot", "overwrite")))

_SweepFields = create_model(
    "_SweepFields", __config__=ConfigDict(extra="forbid", hide_input_in_errors=True),
    corpus=(str | list[str], Field(description=ExtractConfig.model_fields["corpus"].description)),
    # strings are allowed by the schema (a deployment's parameters are checked against it) and become
    # SweepModel entries when validated
    models=(list[SweepModel | str], Field(min_length=1, description="The models: specs (SOURCE:NAME[@TAG]) or "
                                          "{spec, layers, reduce, pretrained, weights, name} entries.")),
    out=(str, Field(description="Folder (or s3:// prefix) of the sweep: one store per model, DIR/<slug>.zarr.")),
    layers=(Names, Field(["auto"], description="Layers of every model (names, globs or the preset `auto`: a "
                             "model's representative depths, see `neuropredictor layers SPEC --preset auto`).")),
    reduce=(str, Field("avgpool", description=ExtractConfig.model_fields["reduce"].description)),
    neural=(str | None, Field(None, description="Neural data (stimuli x targets) to score every model's layers "
                              "against: .npy .npz .csv .nc .zarr. Without it, only features are extracted.")),
    encode=(EncodeSettings, Field(default_factory=EncodeSettings, description="How the neural data is read and "
                                  "the layers are scored (as `neuropredictor encode`).")),
    **fields_of(ExtractConfig, ("corpus", "model", "out", "layers", "reduce")),
)


class SweepConfig(_SweepFields):
    """Many models over one corpus, one store each; re-running resumes."""

    _split = field_validator("models", "layers", mode="before")(comma_list)
    _paths = field_validator("corpus", "out", "neural", mode="before")(path_text)

    @field_validator("models")
    @classmethod
    def _entries(cls, v: list) -> list[SweepModel]:
        models = [SweepModel(spec=m) if isinstance(m, str) else m for m in v]
        seen: dict[str, str] = {}  # a model's store, scores and record are named by its label's slug
        for m in models:
            if (name := slug(m.label)) in seen:
                raise ValueError(f"the models {seen[name]!r} and {m.label!r} would share one store ({name}.zarr): "
                                 "give each entry its own `name` (e.g. {spec: ..., weights: ep1.pt, name: ep1})")
            seen[name] = m.label
        for name, label in seen.items():  # "a" keeps its scores in a-scores.zarr: a model named "a-scores" there
            if name.endswith(SCORES_SUFFIX) and name.removesuffix(SCORES_SUFFIX) in seen:
                raise ValueError(f"the model {label!r} would store its features where "
                                 f"{seen[name.removesuffix(SCORES_SUFFIX)]!r} keeps its scores ({name}.zarr): "
                                 "give it another `name`")
        return models

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> SweepConfig:
        """A sweep from a YAML (or JSON) file with these fields; overrides on top (`encode` merged key by key)."""
        import yaml

        from neuropredictor.errors import NeuroPredictorError

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise NeuroPredictorError(f"cannot read the sweep file {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict):
            raise NeuroPredictorError(f"the sweep file {str(path)!r} must be a mapping of fields (corpus, models, "
                                      f"out, ...), not a {type(data).__name__}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(data.get("encode"), dict) and isinstance(overrides.get("encode"), dict):
            overrides["encode"] = {**data["encode"], **overrides["encode"]}
        return cls(**{**data, **overrides})

    def store_url(self, model: SweepModel) -> str:
        return f"{self.out.rstrip('/')}/{slug(model.label)}.zarr"

    def scores_url(self, model: SweepModel) -> str:
        return f"{self.out.rstrip('/')}/{slug(model.label)}{SCORES_SUFFIX}.zarr"

    def comparison_url(self, suffix: str = ".csv") -> str:
        """The comparison of the models: its table (.csv) or plot (.png)."""
        return f"{self.out.rstrip('/')}/comparison{suffix}"

    def extract_config(self, model: SweepModel) -> ExtractConfig:
        """The model's extraction: exactly what `extract` would run for the same options."""
        shared = self.model_dump(include=set(ExtractConfig.model_fields) - {"model", "out"})
        own = {k: getattr(model, k) for k in _PER_MODEL if getattr(model, k) is not None}
        return ExtractConfig(**{**shared, **own, "model": model.spec, "out": self.store_url(model)})

    def encode_options(self, model: SweepModel) -> EncodeOptions:
        """The model's encoding, as `neuropredictor encode` would run it on its store."""
        if self.neural is None:
            raise ValueError("this sweep has no neural data")
        return EncodeOptions(**self.encode.model_dump(), features=self.store_url(model), neural=self.neural,
                             out=self.scores_url(model), overwrite=True)
