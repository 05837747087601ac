"""The chance test of held-out scores: a permutation null of the median r over a group of targets.

Each permutation shuffles the rows of a fold's held-out responses (one shuffle for all targets, so
their correlations with each other are kept; targets measured on some of the stimuli take the order it
induces on theirs) and recomputes Pearson r against the unchanged predictions. The model never saw
those stimuli, so under "the predictions carry no information about the held-out responses" the
observed median r is one more draw from this null: exact for one train/test split, as long as the held-out
stimuli are exchangeable. Stimuli in groups (`groups`: a concept's images) may share responses the features do
not predict; the shuffles then move whole groups onto groups of their size, and stimuli within them
(`exchanged`): shuffled one by one, 23-31 % of pure noise fell below 0.05 with a group offset as large as the
noise, 3 % so. Chance level: the
null's 95th percentile; p-value: (1 + #null medians >= observed) / (1 + permutations).

With K outer folds the observed r is a mean over folds, and the folds' scores are positively
dependent (each fold's model is trained on the other folds' test stimuli), so averaging independent
per-fold shuffles gives too narrow a null (measured on pure noise, 5 folds: 12 % of p-values below
0.05). The folds' shuffles are therefore paired by the rank of their median r (the k-th highest of
each fold together), as if the folds' medians were perfectly dependent (on noise their targets' fold r's
correlate about +0.2): conservative in our checks, at some cost in power (same check: 1 % below 0.05; one
split: 4 %; a statistics review: 1.3-2 %), though a comonotone coupling is not proven the worst case for a
95th percentile. Each fold's exact p of its own median, combined by Bonferroni, would be provably valid and
cost nothing more, but its floor K / (1 + permutations) then meets Holm's over the layers (1,399 permutations
for 14 layers).

Many layers are many tests: picking the best of 14 layers of pure noise found one "above chance" far more
often than 5 % of the time. A layer is therefore above chance when its p-value adjusted by Holm's step-down
over the layers scored (per group of targets) is at most 0.05 (`holm`): the chance of calling any layer of
an uninformative model above chance stays at most 5 %, whatever the layers' dependence. A permutation
max-statistic would be less conservative for similar layers, but the rank pairing of folds keeps no joint
draw of the layers' nulls to take the maximum of.

Each target has a p-value of its own too (`target_p_values`, the scores' `p`): each fold's r of the target
against the shuffles of that fold's test stimuli (the same shuffles as above) is an exact test, and the target's
p is the smallest of them times the number of folds that scored it (Bonferroni), which holds whatever the folds'
dependence. With one split it is the exact test of the scores' r. A test of the folds pooled (the r of responses
and predictions centred within their folds) against the shuffles within folds was not calibrated: the folds'
models share training stimuli, so their r's are dependent in ways shuffling the test stimuli does not show. On
pure noise (200 stimuli, 256 features, 5 folds) it put 11 % of p below 0.05 with over-fitting alphas (0.1..10)
and piled p near 1 with the default ones; the Bonferroni p: 4.7 % and 4.4 %, with 80 % of the pooled test's power
there on a planted signal (power with the folds paired by rank: 12 % of it; with twice the folds' mean p: 1 %).
A small p says that some fold's model predicts the target, not that all do. Its smallest value is
K / (1 + permutations). It is not adjusted for the number of targets: a map of the targets a layer predicts wants
a false discovery rate over them (Benjamini-Hochberg, `scipy.stats.false_discovery_control`).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from neuropredictor.encode.ridge import unit_columns

CHANCE_QUANTILE = 0.95
_BATCH_BYTES = 2**28  # one batch of permuted responses (permutations x stimuli x targets, float32)
_TIES = 1e-6  # float32 shuffles' r against a float64 observed one: as good as equal counts as at least as high


Part = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # targets, test positions, responses, predictions


def fold_nulls(folds: Sequence[tuple[int, Sequence[Part]]], n_targets: int, permutations: int,
               seed: int, blocks: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """Per outer fold, its (permutations, n_targets) r of shuffled held-out responses against the predictions
    (NaN: a target the fold did not score). folds: per outer fold, its number of test stimuli and the parts it
    scored, (targets, positions, responses, predictions): targets are columns (of n_targets), positions the part's
    test stimuli among the fold's, responses and predictions (len(positions), len(targets)); one part per set of
    targets measured on the same stimuli (see `target_sets`). The same seed gives the same shuffles for every
    layer.

    One shuffle of the fold's test stimuli per permutation, for every part: a part measured on some of them
    takes the order that shuffle induces on its own (each stimulus goes where the shuffle's cycle through it next
    lands among them), so that targets of different sets that share stimuli stay shuffled together, as their
    correlation is in the observed scores. blocks: per fold, the group of each of its test stimuli (`--groups`):
    the shuffles then move whole groups (`exchanged`), and a part measured on some of them is shuffled by its own
    groups (an induced order would mix them), not with the others."""
    rng = np.random.default_rng(seed)
    per_fold = []
    for f, (n_test, parts) in enumerate(folds):
        order = (rng.permuted(np.tile(np.arange(n_test), (permutations, 1)), axis=1) if blocks is None
                 else exchanged(rng, blocks[f], permutations))
        null = np.full((permutations, n_targets), np.nan, np.float32)
        for targets, positions, y, pred in parts:
            if len(positions) == n_test:
                own = order
            elif blocks is None:
                own = _induced(order, positions)
            else:  # the induced order would mix groups: the set's own groups, shuffled as the seed says for every layer
                key = int.from_bytes(hashlib.sha256(np.asarray(positions, np.int64).tobytes()).digest()[:8], "little")
                own = exchanged(np.random.default_rng([seed, f, key]), np.asarray(blocks[f])[positions], permutations)
            zy, zp = unit_columns(y, np.float32), unit_columns(pred, np.float32)
            n, t = zy.shape
            step = max(1, _BATCH_BYTES // (4 * n * t))
            for i in range(0, permutations, step):
                null[i:i + step, targets] = np.einsum("pnt,nt->pt", zy[own[i:i + step]], zp)
        per_fold.append(null)
    return per_fold


def exchanged(rng: np.random.Generator, labels: Sequence, permutations: int) -> np.ndarray:
    """(permutations, n) shuffles of n stimuli in groups (labels): each moves whole groups onto groups of the same
    size, and the stimuli within them. Stimuli of a group may share responses the features do not predict (one
    concept's images); shuffled one by one, that shared part met unrelated predictions and made p-values too small
    (19 % of pure noise below 0.05 with a group offset as large as the noise). A group of a size no other group
    has stays in place, its stimuli shuffled within it: conservative (`lone_groups` tells when most are)."""
    _, inverse = _groups(labels, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)] if len(inverse) else []
    order = np.empty((permutations, len(inverse)), np.int64)
    by_size: dict[int, list[np.ndarray]] = {}
    for m in members:
        by_size.setdefault(len(m), []).append(m)
    for size, groups in by_size.items():
        slots = np.stack(groups)  # (groups of this size, size): their stimuli
        moved = rng.permuted(np.tile(np.arange(len(groups)), (permutations, 1)), axis=1)  # which group goes where
        within = rng.permuted(np.tile(np.arange(size), (permutations, len(groups), 1)), axis=2)
        order[np.arange(permutations)[:, None, None], slots[None]] = np.take_along_axis(slots[moved], within, axis=2)
    return order


def _groups(labels: Sequence, **unique: bool) -> tuple[np.ndarray, np.ndarray]:
    """np.unique of the labels as text, as the splits read groups (mixed types, None and NaN alike)."""
    return np.unique(np.asarray([str(x) for x in labels]), **unique)


def lone_groups(labels: Sequence) -> bool:
    """Whether most stimuli among labels are in groups of a size no other group has: `exchanged` cannot move
    those groups."""
    _, counts = _groups(labels, return_counts=True)
    alone = np.bincount(counts)[counts] == 1  # per group: the only one of its size
    return bool(counts[alone].sum() * 2 > counts.sum())


def null_medians(per_fold: Sequence[np.ndarray], groups: Sequence[np.ndarray]) -> np.ndarray:
    """(permutations, groups) null medians of r from the folds' nulls (`fold_nulls`); groups are boolean masks
    over the targets. Folds are paired by the rank of their shuffles' median r in each group (see the module
    docstring); a target's r is the mean over the folds that scored it, as observed."""
    out = np.empty((per_fold[0].shape[0], len(groups)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a group of constant targets has no median: NaN
        for gi, g in enumerate(groups):
            # summed fold by fold: a stack of every fold's (permutations, targets) is as large again as the folds'
            out[:, gi] = np.nanmedian(_paired_mean(
                f[np.ix_(np.argsort(np.nanmedian(f[:, g], axis=1)), np.flatnonzero(g))] for f in per_fold), axis=1)
    return out


def target_p_values(folds: Sequence[tuple[int, Sequence[Part]]], nulls: Sequence[np.ndarray],
                    n_targets: int) -> np.ndarray:
    """Per target (of n_targets; NaN: not scored), the p-value of "its predictions tell nothing of its held-out
    responses in any fold": each fold's exact p of its r against that fold's shuffles, (1 + shuffles at least as
    high) / (1 + permutations), the smallest times the number of folds that scored the target, at most 1
    (Bonferroni: valid however the folds depend on each other; see the module docstring). folds: as `fold_nulls`
    takes them; nulls: its result. With one split it is the exact p of the scores' r. Not adjusted for the number
    of targets."""
    best = np.full(n_targets, np.inf)
    tested = np.zeros(n_targets, int)
    for (_, parts), fold_null in zip(folds, nulls):
        for targets, _, y, pred in parts:
            targets = np.asarray(targets)
            r = (unit_columns(y) * unit_columns(pred)).sum(0)  # NaN: constant in this fold, not tested here
            p = (1 + (fold_null[:, targets] >= r[None, :] - _TIES).sum(0)) / (1 + fold_null.shape[0])
            scored = np.isfinite(r)
            best[targets[scored]] = np.minimum(best[targets[scored]], p[scored])
            tested[targets[scored]] += 1
    return np.where(tested > 0, np.minimum(1.0, tested * best), np.nan)


def _paired_mean(folds: Iterable[np.ndarray]) -> np.ndarray:
    """The mean of the folds' (permutations, targets) arrays, row by row, over the folds where a value is finite."""
    total = count = None
    for ranked in folds:
        scored = np.isfinite(ranked)
        ranked = np.where(scored, ranked, 0.0)
        if total is None:
            total, count = ranked, scored.astype(np.float32)
        else:
            total += ranked
            count += scored
    with np.errstate(invalid="ignore"):
        return total / count


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
