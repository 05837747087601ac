"""The chance test of held-out scores: a permutation null of the median r over a group of targets.

Each permutation shuffles the rows of a fold's held-out responses (one shuffle for all targets, so
their correlations with each other are kept; targets measured on some of the stimuli take the order it
induces on theirs) and recomputes Pearson r against the unchanged predictions. The model never saw
those stimuli, so under "the predictions carry no information about the held-out responses" the
observed median r is one more draw from this null: exact for one train/test split. Chance level: the
null's 95th percentile; p-value: (1 + #null medians >= observed) / (1 + permutations).

With K outer folds the observed r is a mean over folds, and the folds' scores are positively
dependent (each fold's model is trained on the other folds' test stimuli), so averaging independent
per-fold shuffles gives too narrow a null (measured on pure noise, 5 folds: 12 % of p-values below
0.05). The folds' shuffles are therefore paired by the rank of their median r (the k-th highest of
each fold together), as if the folds' medians were perfectly dependent: the test stays on the safe
side, at some cost in power (same check: 1 % below 0.05; one split: 4 %).

Many layers are many tests: picking the best of 14 layers of pure noise found one "above chance" far more
often than 5 % of the time. A layer is therefore above chance when its p-value adjusted by Holm's step-down
over the layers scored (per group of targets) is at most 0.05 (`holm`): the chance of calling any layer of
an uninformative model above chance stays at most 5 %, whatever the layers' dependence. A permutation
max-statistic would be less conservative for similar layers, but the rank pairing of folds keeps no joint
draw of the layers' nulls to take the maximum of.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from neuropredictor.encode.ridge import unit_columns

CHANCE_QUANTILE = 0.95
_BATCH_BYTES = 2**28  # one batch of permuted responses (permutations x stimuli x targets, float32)


Part = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # targets, test positions, responses, predictions


def null_medians(folds: Sequence[tuple[int, Sequence[Part]]], n_targets: int, groups: Sequence[np.ndarray],
                 permutations: int, seed: int) -> np.ndarray:
    """(permutations, groups) null medians of r. folds: per outer fold, its number of test stimuli and the parts
    it scored, (targets, positions, responses, predictions): targets are columns (of n_targets), positions
    the part's test stimuli among the fold's, responses and predictions (len(positions), len(targets)); one part
    per set of targets measured on the same stimuli (see `target_sets`). groups are boolean masks over the
    targets. The same seed gives the same shuffles for every layer.

    One shuffle of the fold's test stimuli per permutation, for every part: a part measured on some of them
    takes the order that shuffle induces on its own (each stimulus goes where the shuffle's cycle through it next
    lands among them), so that targets of different sets that share stimuli stay shuffled together, as their
    correlation is in the observed scores."""
    rng = np.random.default_rng(seed)
    per_fold = []
    for n_test, parts in folds:
        order = rng.permuted(np.tile(np.arange(n_test), (permutations, 1)), axis=1)
        null = np.full((permutations, n_targets), np.nan, np.float32)  # NaN: a target this fold did not score
        for targets, positions, y, pred in parts:
            own = order if len(positions) == n_test else _induced(order, positions)
            zy, zp = unit_columns(y, np.float32), unit_columns(pred, np.float32)
            n, t = zy.shape
            step = max(1, _BATCH_BYTES // (4 * n * t))
            for i in range(0, permutations, step):
                null[i:i + step, targets] = np.einsum("pnt,nt->pt", zy[own[i:i + step]], zp)
        per_fold.append(null)
    out = np.empty((permutations, len(groups)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a group of constant targets has no median: NaN
        for gi, g in enumerate(groups):
            # folds paired by the rank of their shuffles' median r in this group (see the module docstring); a
            # target's r is the mean over the folds that scored it, as observed. Summed fold by fold: a stack of
            # every fold's (permutations, targets) is as large again as the folds' nulls
            total = count = None
            for f in per_fold:
                ranked = f[np.ix_(np.argsort(np.nanmedian(f[:, g], axis=1)), np.flatnonzero(g))]
                scored = np.isfinite(ranked)
                ranked[~scored] = 0.0
                if total is None:
                    total, count = ranked, scored.astype(np.float32)
                else:
                    total += ranked
                    count += scored
            out[:, gi] = np.nanmedian(total / count, axis=1)
    return out


def _induced(order: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Per row of `order` (a permutation of 0..n-1), the permutation it induces on the sorted `positions`, as
    indices into them: from each position, follow the permutation until it lands on a position again."""
    n = order.shape[1]
    inside = np.zeros(n, bool)
    inside[positions] = True
    local = np.full(n, -1)
    local[positions] = np.arange(len(positions))
    out = order[:, positions]
    todo = ~inside[out]
    for _ in range(n):  # a cycle comes back within n steps
        if not todo.any():
            break
        r, c = np.nonzero(todo)
        out[r, c] = order[r, out[r, c]]
        todo[r, c] = ~inside[out[r, c]]
    return local[out]


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaN: not tested, left out of the family): the
    i-th smallest of m is multiplied by m - i + 1, made non-decreasing in that order, capped at 1. Rejecting
    those at most 0.05 keeps the family-wise error at most 0.05 under any dependence."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    return out


def permutations_needed(n_layers: int) -> int:
    """The fewest permutations with which the best of n_layers can be above chance after Holm's adjustment:
    n_layers / (1 + permutations) <= 0.05."""
    return max(0, math.ceil(round(n_layers / (1 - CHANCE_QUANTILE), 9)) - 1)


def chance_summary(observed: np.ndarray, null: np.ndarray) -> dict[str, np.ndarray]:
    """Per group, from its observed median r and its null medians (permutations, groups): the chance
    level, the null's 5th percentile (lower edge of the chance band) and the p-value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        chance, low = np.nanquantile(null, [CHANCE_QUANTILE, 1 - CHANCE_QUANTILE], axis=0)
    p = (1 + (null >= observed[None, :]).sum(0)) / (1 + null.shape[0])
    return {"chance": chance, "null_low": low, "p_value": np.where(np.isfinite(observed), p, np.nan)}
