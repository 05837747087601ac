"""The options of an encoding run: one home for their names, defaults, checks and help texts. The CLI
(`neuropredictor encode`) takes its options' defaults and help from here, the Python API (`encode`,
`encode_command`) takes these fields as keywords, and the `encode` flow's parameters derive from
`EncodeOptions`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from neuropredictor.config import Names, comma_list, path_text
from neuropredictor.encode._common import EncodingError
from neuropredictor.encode.chance import CHANCE_QUANTILE
from neuropredictor.encode.neural import NeuralData, load_neural
from neuropredictor.encode.ridge import _DEFAULT_BATCH_BYTES, DEFAULT_ALPHAS, _check_alphas

_O = TypeVar("_O", bound="FitOptions")


def parse_alphas(spec: str | Sequence[float] | np.ndarray | None) -> np.ndarray:
    """Alpha grid from "1,10,100", "logspace:-2:6:17" (10^-2 .. 10^6, 17 values), a list, or None
    (DEFAULT_ALPHAS)."""
    if spec is None:
        return DEFAULT_ALPHAS.copy()
    if isinstance(spec, str):
        s = spec.strip()
        try:
            if s.lower().startswith("logspace:"):
                lo, hi, num = s.split(":")[1:]
                return np.logspace(float(lo), float(hi), int(num))
            return _check_alphas([float(x) for x in s.split(",") if x.strip()])
        except ValueError as e:
            raise EncodingError(f"cannot read alphas {spec!r}: use '1,10,100' or 'logspace:-2:6:17' ({e})") from e
    return _check_alphas(spec)


class FitOptions(BaseModel):
    """How every layer is scored: which layers, the held-out stimuli, the ridge grid, the device."""

    model_config = ConfigDict(extra="forbid")

    layers: Names | None = Field(None, description="Layers to score, a list or 'a,b' (default: every layer "
                                     "of the store, in model order).")
    alphas: str | list[float] | None = Field(None, description="Ridge grid: '1,10,100', 'logspace:-2:6:17' or a "
                                             f"list (default {len(DEFAULT_ALPHAS)} values from "
                                             f"{DEFAULT_ALPHAS[0]:g} to {DEFAULT_ALPHAS[-1]:g}, log-spaced). "
                                             "One alpha is chosen per target and layer.")
    folds: int | None = Field(None, ge=2, description="K outer folds instead of one split: every stimulus is held "
                              "out once, scores are averaged over folds.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Held-out fraction when neither a split nor folds "
                                 "are given (a random split that depends only on the seed and the keys).")
    inner_folds: int = Field(5, ge=2, description="Folds of the per-target alpha search on the training stimuli.")
    seed: int = Field(0, description="Seed of random splits and folds.")
    device: str = Field("auto", description="auto (CUDA if present, else CPU), cpu, cuda, cuda:N or numpy.")
    dtype: Literal["float32", "float64"] = Field("float32", description="Precision of the ridge solver.")
    solver: Literal["auto", "ridge", "kernel"] = Field("auto", description="Primal ridge, linear kernel ridge, or "
                                                       "auto: whichever costs fewer operations for the shape.")
    permutations: int = Field(1000, ge=0, description="Permutations of the chance test: each layer's held-out "
                              "predictions are re-scored against shuffled responses; a layer is above chance when "
                              f"its p-value, adjusted for the number of layers (Holm), is at most "
                              f"{1 - CHANCE_QUANTILE:.2g}. 0 skips the test.")
    batch_bytes: int = Field(_DEFAULT_BATCH_BYTES, ge=1, description="Cap on the size of the solver's largest "
                             "intermediates (alphas and targets are batched to stay under it).")

    _split_layers = field_validator("layers", mode="before")(comma_list)

    @field_validator("alphas", mode="before")
    @classmethod
    def _check_grid(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, str):
            v = [float(a) for a in np.ravel(v)]
        try:  # fail when the options are made, not after the first layer's fit
            parse_alphas(v)
        except EncodingError as e:
            raise ValueError(str(e)) from e
        return v

    @property
    def alpha_grid(self) -> np.ndarray:
        return parse_alphas(self.alphas)

    @classmethod
    def resolve(cls: type[_O], options: _O | None, fields: Mapping[str, Any]) -> _O:
        """`options` with `fields` on top, validated; a fresh instance when options is None."""
        if options is None:
            return cls(**fields)
        return type(options).model_validate({**options.model_dump(), **fields}) if fields else options


class EncodeOptions(FitOptions):
    """A whole run: where the features, the neural data and the scores are, how to read the neural data,
    and how to score (`FitOptions`)."""

    features: str = Field(description="Features store written by `neuropredictor extract` (path or s3://...).")
    neural: str = Field(description="Neural data (stimuli x targets): .npy, .npz, .csv, .nc or .zarr.")
    out: str = Field(description="Where the scores go (a Zarr store); the plot goes next to it (OUT.png).")
    # not `keys`: a model with a `keys` attribute looks like a mapping to Prefect's parameter handling
    keys_file: str | None = Field(None, description="Text file of stimulus keys, one per line, in row order: "
                                  "needed for .npy, overrides the keys inside other formats.")
    key_column: str = Field("key", description="Where the keys are in NEURAL: csv column, .npz array, or .nc/.zarr "
                            "coordinate on the first dimension (if 'key' is absent: keys, stimulus, stimuli, ..., "
                            "then the first dimension's own coordinate).")
    split: str | None = Field(None, description="Train/test split: a column/array/variable of NEURAL holding "
                              "booleans or 0/1 (its name says which: True marks training stimuli in is_train, test "
                              "ones in is_test / heldout / is_val; other names are refused) or 'train'/'test', "
                              "or a text file of test keys. Default: a random held-out fraction, or `folds`.")
    groups: str | None = Field(None, description="Group label per stimulus (the concept an image shows, the photo "
                               "a crop came from): a column/array/variable of NEURAL, or a text file with one label "
                               "per line in row order. Stimuli of one group are never on both sides of a split: "
                               "outer folds, the random split, and the alpha search's inner folds.")
    targets: str | None = Field(None, description="Target names: a name inside NEURAL or a text file (default: "
                                "csv columns, a `targets` array, the second dimension's coordinate).")
    roi: str | None = Field(None, description="ROI label per target, for per-ROI scores: a name inside NEURAL or a "
                            "text file (an array `roi` is found without it).")
    ceiling: str | None = Field(None, description="Noise ceiling per target (in r), adds r / ceiling: a name inside "
                                "NEURAL, a .npy or a text file (`ceiling` / `noise_ceiling` are found without it).")
    array: str | None = Field(None, description="The array (.npz) or variable (.nc/.zarr) of NEURAL that holds "
                              "the data, when the file has several.")
    plot: str | None = Field(None, description="PNG path of the layer-wise plot (default OUT.png).")
    overwrite: bool = Field(False, description="Replace existing scores at OUT.")

    LOCATIONS: ClassVar[tuple[str, ...]] = ("features", "neural", "out", "keys_file", "plot")  # files or folders
    OUTPUTS: ClassVar[tuple[str, ...]] = ("out", "plot")  # those written
    _paths = field_validator(*LOCATIONS, mode="before")(path_text)

    def read_neural(self, storage_options: Mapping | None = None) -> NeuralData:
        """The neural data these options name."""
        return load_neural(self.neural, keys=self.keys_file, key_column=self.key_column, split=self.split,
                           targets=self.targets, roi=self.roi, ceiling=self.ceiling, array=self.array,
                           groups=self.groups, storage_options=storage_options)


# How the neural data file is read: the fields EncodeOptions adds to FitOptions, but where things are and
# what happens to the scores; `encode`/`prepare` take them as keywords when `neural` is a file.
READING = tuple(n for n in EncodeOptions.model_fields if n not in FitOptions.model_fields
                and n not in ("features", "neural", "out", "plot", "overwrite"))


def split_reading(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the `READING` options among keyword fields, the others: `FitOptions`')."""
    return ({k: v for k, v in fields.items() if k in READING}, {k: v for k, v in fields.items() if k not in READING})


def read_with(neural: Any, reading: Mapping[str, Any], storage_options: Mapping | None = None) -> NeuralData:
    """The neural data: `neural` itself (NeuralData), or the file it names read with the `READING` options."""
    if isinstance(neural, NeuralData):
        if reading:
            raise EncodingError(f"{', '.join(reading)} describe how a neural data file is read; the neural data "
                                "given is already loaded (NeuralData): drop them, or pass the file's path")
        return neural
    args = {("keys" if name == "keys_file" else name): value for name, value in reading.items()}
    return load_neural(neural, storage_options=storage_options, **args)
