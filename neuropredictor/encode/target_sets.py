"""Targets measured on different stimuli: neurons recorded in different sessions, subjects shown different
images, voxels lost in some runs. NaN marks a stimulus a target was not measured on. Targets are grouped by
the set of stimuli they were measured on, and each group is fitted and scored on those stimuli only, with
the split that every target shares (a stimulus is on the same side for all of them): no stimulus is
dropped for every target because some targets lack it. `report_unscorable` says which targets cannot be scored
and why."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuropredictor.encode._common import _EXAMPLES, AlignmentWarning, EncodingError, _fmt
from neuropredictor.encode.align import inner_group_folds

Pairs = list[tuple[np.ndarray, np.ndarray]]

# Each set costs a fit of its own: beyond this many, the NaNs are stray (dropouts), not sessions
MAX_TARGET_SETS = 64
_BLOCK = 4096  # target columns read at a time


@dataclass
class TargetSet:
    """Targets measured on the same stimuli, and where they are fitted."""

    targets: np.ndarray  # columns of the matched responses
    rows: np.ndarray  # bool over the matched stimuli: measured
    splits: list[tuple[np.ndarray, np.ndarray] | None]  # per outer fold, (train, test) rows; None: too few here
    inner: list[Pairs | None] | None = None  # per outer fold, the grouped alpha search's folds (with groups)


def measured_sets(Y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(targets, rows measured) per distinct set of measured stimuli, in the order of each set's first
    target. Y: (stimuli, targets), NaN / inf where not measured."""
    # one byte string per target column: unique on bits, not on a (targets x stimuli) bool matrix; a block of
    # columns at a time, as Y can be large (10,000 x 100,000)
    packed = np.empty((Y.shape[1], (Y.shape[0] + 7) // 8), np.uint8)
    for j in range(0, Y.shape[1], _BLOCK):
        packed[j:j + _BLOCK] = np.packbits(~np.isfinite(Y[:, j:j + _BLOCK]), axis=0).T
    if not packed.any():
        return [(np.arange(Y.shape[1]), np.ones(Y.shape[0], bool))]
    _, first, which = np.unique(packed.view(np.dtype((np.void, packed.shape[1]))).ravel(), return_index=True,
                                return_inverse=True)
    if len(first) > MAX_TARGET_SETS:
        raise EncodingError(
            f"the targets were measured on {len(first)} different sets of stimuli (NaN marks a stimulus a target "
            f"was not measured on); each set is fitted on its own, and more than {MAX_TARGET_SETS} would multiply "
            "the fit's time. If the NaNs are stray (dropouts), fill them (e.g. with the target's mean) or drop "
            "those stimuli; if the targets come from many sessions, score them in files of their own")
    order = np.argsort(first, kind="stable")
    return [(np.flatnonzero(which.ravel() == s), np.isfinite(Y[:, first[s]])) for s in order]


def target_sets(Y: np.ndarray, splits: Pairs, inner: list[Pairs] | None, groups: Sequence[str] | None,
                inner_folds: int, seed: int, min_train: int, min_test: int) -> list[TargetSet]:
    """The sets of `measured_sets` with their own splits: the shared ones cut to the set's stimuli. A fold
    that leaves a set too few stimuli to fit (min_train) or score (min_test), or too few groups for the
    alpha search, does not score that set (None)."""
    out = []
    for targets, rows in measured_sets(Y):
        if rows.all():
            out.append(TargetSet(targets, rows, list(splits), list(inner) if inner is not None else None))
            continue
        own: list[tuple[np.ndarray, np.ndarray] | None] = []
        own_inner: list[Pairs | None] = []
        for tr, te in splits:
            tr, te = tr[rows[tr]], te[rows[te]]
            folds = None
            if len(tr) >= min_train and len(te) >= min_test and groups is not None:
                try:
                    folds = inner_group_folds(np.asarray(groups, dtype=object)[tr], inner_folds, seed)
                except EncodingError:  # its training stimuli fall in too few groups
                    tr = tr[:0]
            ok = len(tr) >= min_train and len(te) >= min_test
            own.append((tr, te) if ok else None)
            own_inner.append(folds if ok else None)
        out.append(TargetSet(targets, rows, own, own_inner if groups is not None else None))
    return out


def report_unscorable(sets: list[TargetSet], Y: np.ndarray, names: list[str], report: dict[str, Any],
                      min_train: int, min_test: int) -> None:
    """Report (in the alignment report's `dropped`, and as warnings) the targets that cannot be scored: measured
    on too few stimuli for a fold to fit and score them (an error if that is all of them), or constant (r is
    undefined); and warn of those scored in some folds only."""
    lost = [s for s in sets if not any(s.splits)]
    if len(lost) == len(sets):
        raise EncodingError(f"no target was measured on enough stimuli for a fold to fit and score it (at least "
                            f"{min_train} training and {min_test} test stimuli; with groups, enough groups for "
                            "the inner folds): the sets of stimuli the targets share are too small")
    lost_targets = {int(i) for s in lost for i in s.targets}
    few = [names[i] for i in sorted(lost_targets)]
    constant = [names[i] for i in np.flatnonzero(_constant_columns(Y)) if i not in lost_targets]
    for reason, found, why in (
            ("few_stimuli_targets", few, "target measured on too few stimuli for a fold to fit and score it"),
            ("constant_targets", constant, "target constant over the stimuli it was measured on: r is undefined")):
        report["dropped"][reason] = {"count": len(found), "examples": found[:_EXAMPLES],
                                     "why": f"{why} (scores stay NaN)"}
        if found:
            warnings.warn(f"{len(found)} targets cannot be scored, their scores stay NaN: {why} ({_fmt(found)})",
                          AlignmentWarning, stacklevel=3)
    # scored, but not in every fold: fewer held-out stimuli behind their r than the split's
    partial = [names[i] for s in sets if any(s.splits) and not all(s.splits) for i in s.targets]
    if partial:
        warnings.warn(f"{len(partial)} targets are scored in only some of the {len(sets[0].splits)} folds (their "
                      f"stimuli are too few in the others): their r rests on fewer held-out stimuli ({_fmt(partial)})",
                      AlignmentWarning, stacklevel=3)


def _constant_columns(Y: np.ndarray, block: int = 4096) -> np.ndarray:
    """Per column, whether its finite values are all equal; a block of columns at a time (Y can be large)."""
    out = np.empty(Y.shape[1], bool)
    for j in range(0, Y.shape[1], block):
        part = Y[:, j:j + block]
        finite = np.isfinite(part)
        out[j:j + block] = np.where(finite, part, -np.inf).max(0) == np.where(finite, part, np.inf).min(0)
    return out
