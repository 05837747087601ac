"""The ridge solver for one layer on plain arrays (`encode_layer`, or `encode_rows` on rows of one matrix):
standardisation with training statistics, per-target alpha by inner cross-validation (himalaya, primal or
kernel by cost; the kernels built here a block of features at a time, so that a wide layer is never copied
whole), held-out Pearson r and R^2."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from neuropredictor.encode._common import EncodingError

log = logging.getLogger(__name__)

#: Default ridge grid: 1e-2 .. 1e6, two points per decade. On standardised features the useful
#: alpha grows with the number of features and the noise level, so the grid reaches far up.
DEFAULT_ALPHAS = np.logspace(-2, 6, 17)

_MIN_TRAIN = 10  # fewer training stimuli than this cannot choose alpha by cross-validation sensibly
_DEFAULT_BATCH_BYTES = 2**30  # size of one large intermediate of the solver (see _solver_batches)


def encode_layer(X_train: np.ndarray, Y_train: np.ndarray, X_test: np.ndarray, Y_test: np.ndarray,
                 alphas: Sequence[float] | np.ndarray | None = None, n_folds: int = 5, *, cv: Any = None,
                 seed: int = 0, device: str = "auto", dtype: str = "float32", solver: str = "auto",
                 batch_bytes: int = _DEFAULT_BATCH_BYTES, return_predictions: bool = False) -> dict[str, Any]:
    """Fit ridge on one layer's training stimuli and score it on the test stimuli, for all targets.

    X_*: (n, ...) features (flattened here); Y_*: (n, n_targets) responses. Features are
    standardised with the training rows' mean and std (constant features become 0); targets are
    z-scored with the training rows' statistics too, which changes neither the chosen alphas nor
    r / R^2 but keeps float32 well-conditioned. An intercept is fitted in every fold. The caller's
    arrays are not modified.

    alphas: ridge grid (default DEFAULT_ALPHAS); one alpha is chosen per target by `n_folds`-fold
        cross-validation on the training rows only (shuffled with `seed`), minimising the squared
        error. cv: a scikit-learn splitter to use instead (e.g. LeaveOneOut()), or the (train, test)
        row index pairs themselves (a grouped search: `align.inner_group_folds`).
    solver: "ridge" (himalaya RidgeCV, primal), "kernel" (himalaya KernelRidgeCV on the linear kernel,
        built here a block of features at a time) or "auto": whichever needs fewer operations for this
        shape (see `_solver_flops`). Both give the same fit; kernel wins when features outnumber
        stimuli, and also somewhat below that, because himalaya's primal solver builds a features x
        stimuli matrix per alpha.
    device: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N" or "numpy".
    dtype: "float32" (fast, enough for these scores) or "float64".
    batch_bytes: cap on the size of the solver's largest intermediates (alphas and targets are
        processed in batches to stay under it).

    Returns numpy arrays: r, r2, alpha, cv_score (per target), and n_train, n_test, n_features,
    solver, backend, seconds; predictions (n_test, n_targets, in Y's units) if return_predictions.
    """
    Xtr, Xte = _as_2d(X_train, "X_train"), _as_2d(X_test, "X_test")
    if Xtr.shape[1] != Xte.shape[1]:
        raise EncodingError(f"train and test differ in width: features {Xtr.shape[1]} vs {Xte.shape[1]}")
    for name, a in (("X_train", Xtr), ("X_test", Xte)):
        if not np.isfinite(a).all():
            raise EncodingError(f"{name} holds NaN or inf; drop those stimuli first (encode() does this)")
    X = np.concatenate([Xtr, Xte])
    return encode_rows(X, np.arange(len(Xtr)), np.arange(len(Xtr), len(X)), Y_train, Y_test, alphas, n_folds, cv=cv,
                       seed=seed, device=device, dtype=dtype, solver=solver, batch_bytes=batch_bytes,
                       return_predictions=return_predictions)


def encode_rows(X: np.ndarray, train: np.ndarray, test: np.ndarray, Y_train: np.ndarray, Y_test: np.ndarray,
                alphas: Sequence[float] | np.ndarray | None = None, n_folds: int = 5, *, cv: Any = None,
                seed: int = 0, device: str = "auto", dtype: str = "float32", solver: str = "auto",
                batch_bytes: int = _DEFAULT_BATCH_BYTES, return_predictions: bool = False) -> dict[str, Any]:
    """`encode_layer` on rows of one finite (n, n_features) matrix: X[train] and X[test], with Y_train and
    Y_test their responses. X is read a block of features at a time and never copied whole: the kernel
    solver, chosen for wide layers, builds its kernels block by block, so that a layer's fit needs little
    more memory than the layer (the primal solver, chosen when features are fewer, copies the rows)."""
    t0 = time.perf_counter()
    alphas = _check_alphas(alphas)
    train, test = np.asarray(train), np.asarray(test)
    if train.dtype.kind not in "iu" or test.dtype.kind not in "iu":
        raise EncodingError(f"train and test are row indices (integers), not {train.dtype} / {test.dtype}")
    if np.intersect1d(train, test).size:
        raise EncodingError("train and test share rows: a stimulus must not be both fitted and scored")
    Ytr, Yte = _as_targets(Y_train, "Y_train"), _as_targets(Y_test, "Y_test")
    if len(train) != Ytr.shape[0] or len(test) != Yte.shape[0]:
        raise EncodingError(f"rows differ: X_train {len(train)} vs Y_train {Ytr.shape[0]}, "
                            f"X_test {len(test)} vs Y_test {Yte.shape[0]}")
    if Ytr.shape[1] != Yte.shape[1]:
        raise EncodingError(f"train and test differ in width: targets {Ytr.shape[1]} vs {Yte.shape[1]}")
    n_train, n_features = len(train), X.shape[1]
    n_targets = Ytr.shape[1]
    for name, a in (("Y_train", Ytr), ("Y_test", Yte)):
        if not np.isfinite(a).all():
            raise EncodingError(f"{name} holds NaN or inf; drop those stimuli first (encode() does this)")
    if cv is None:
        if n_train < max(_MIN_TRAIN, 2 * n_folds):
            raise EncodingError(f"{n_train} training stimuli are too few for {n_folds}-fold alpha selection; "
                                f"need at least {max(_MIN_TRAIN, 2 * n_folds)}")
        from sklearn.model_selection import KFold

        # Shuffled: stimuli often come sorted by category, and unshuffled folds would then
        # hold out whole categories.
        cv = KFold(n_splits=int(n_folds), shuffle=True, random_state=int(seed))
    # Materialised: himalaya asks the splitter for get_n_splits() without X, which LeaveOneOut
    # and other sample-count-dependent splitters cannot answer.
    try:
        pairs = cv if isinstance(cv, (list, tuple)) else cv.split(np.zeros((n_train, 1)))
        splits = [(np.asarray(a), np.asarray(b)) for a, b in pairs]
    except Exception as e:
        raise EncodingError(f"inner cross-validation splitter {cv!r} failed on {n_train} stimuli: {e}") from e
    if not splits or any(len(a) == 0 or len(b) == 0 for a, b in splits):
        what = "folds given" if isinstance(cv, (list, tuple)) else repr(cv)
        raise EncodingError(f"inner cross-validation ({what}) has an empty fold for {n_train} stimuli")
    if dtype not in ("float32", "float64"):
        raise EncodingError(f"dtype must be 'float32' or 'float64', not {dtype!r}")
    np_dtype = np.dtype(dtype)

    # Standardise with training statistics only: test rows must not inform the model.
    mu, sd = _column_stats(X, train)
    ymu, ysd = Ytr.mean(0), Ytr.std(0)
    ysd[ysd == 0] = 1.0
    Ytr_z = ((Ytr - ymu) / ysd).astype(np_dtype)

    n_inner_train, n_inner_test = max(len(a) for a, _ in splits), max(len(b) for _, b in splits)
    if solver == "auto":
        costs = {name: _solver_flops(name, n_train, n_features, n_targets, len(alphas), n_inner_train,
                                     n_inner_test, len(splits)) for name in ("ridge", "kernel")}
        solver = min(costs, key=costs.__getitem__)
    if solver not in ("ridge", "kernel"):
        raise EncodingError(f"solver must be 'auto', 'ridge' or 'kernel', not {solver!r}")
    width = n_features if solver == "ridge" else n_train
    solver_params = _solver_batches(width, n_inner_train, n_inner_test, n_train, n_targets, len(alphas),
                                    np_dtype.itemsize, batch_bytes)

    with _himalaya_backend(device) as backend:
        with warnings.catch_warnings():
            # himalaya suggests the other solver by shape alone; we chose by estimated cost
            warnings.filterwarnings("ignore", message=r"Solving (linear kernel )?ridge is slower", category=UserWarning)
            if solver == "ridge":
                from himalaya.ridge import RidgeCV

                model = RidgeCV(alphas=alphas.astype(np_dtype), fit_intercept=True, cv=splits,
                                solver_params=solver_params)
                fit_on, predict_on = (_standardise(X[rows], mu, sd, np_dtype) for rows in (train, test))
            else:
                from himalaya.kernel_ridge import KernelRidgeCV

                model = KernelRidgeCV(alphas=alphas.astype(np_dtype), kernel="precomputed", fit_intercept=True,
                                      cv=splits, solver_params=solver_params, warn=False)
                fit_on, predict_on = _linear_kernels(X, train, test, mu, sd, np_dtype, backend)
            model.fit(fit_on, Ytr_z)
            del fit_on
            pred_z = backend.to_numpy(model.predict(predict_on)).astype(np.float64)
            del predict_on
        best = backend.to_numpy(model.best_alphas_).astype(np.float64)
        cv_score = backend.to_numpy(model.cv_scores_).astype(np.float64).reshape(-1)
        backend_name = backend.name
        del model

    pred = pred_z * ysd + ymu
    # the grid values themselves, not float32 round-trips of them (1e6 must read as 1e6)
    best = alphas[np.abs(np.log(best[:, None]) - np.log(alphas[None, :])).argmin(1)]
    out: dict[str, Any] = {
        "r": pearson_r(Yte, pred),
        "r2": r2_score(Yte, pred),
        "alpha": best,
        "cv_score": cv_score,
        "n_train": int(n_train),
        "n_test": int(len(test)),
        "n_features": int(n_features),
        "solver": solver,
        "backend": backend_name,
        "seconds": time.perf_counter() - t0,
    }
    if return_predictions:
        out["predictions"] = pred
    return out


# Features per block of the kernels' sums: fixed, not from batch_bytes, as the order of float sums is part of
# the numbers (a rerun with a smaller batch_bytes must give the same scores)
_KERNEL_BLOCK = 2048


def _linear_kernels(X: np.ndarray, train: np.ndarray, test: np.ndarray, mu: np.ndarray, sd: np.ndarray,
                    dtype: np.dtype, backend: Any) -> tuple[Any, Any]:
    """The linear kernels of the standardised features, (train x train) and (test x train), on the backend's
    device: sums over blocks of features, each block standardised on its own, so that no standardised copy
    of the whole layer is made."""
    rows = np.concatenate([train, test])
    n_train = len(train)
    k_train = k_test = None
    for j in range(0, X.shape[1], _KERNEL_BLOCK):
        cols = slice(j, j + _KERNEL_BLOCK)
        part = backend.asarray(_standardise(X[rows, cols], mu[cols], sd[cols], dtype))
        z_train = part[:n_train]
        if k_train is None:
            k_train, k_test = z_train @ z_train.T, part[n_train:] @ z_train.T
        else:
            k_train += z_train @ z_train.T
            k_test += part[n_train:] @ z_train.T
        del part, z_train
    return k_train, k_test


def _column_stats(X: np.ndarray, rows: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std (float64) over the rows, a block of columns at a time: a float64 copy of a
    whole wide layer (10,000 stimuli x 100,000 features = 8 GB) is never made. Zero std becomes 1."""
    mu = np.empty(X.shape[1])
    sd = np.empty(X.shape[1])
    for j in range(0, X.shape[1], block):
        part = X[rows, j:j + block].astype(np.float64)
        mu[j:j + block] = part.mean(0)
        sd[j:j + block] = part.std(0)
    sd[sd == 0] = 1.0  # a constant feature carries nothing; centred it is 0 everywhere
    return mu, sd


def _standardise(X: np.ndarray, mu: np.ndarray, sd: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """X, rows or columns taken by index (a copy of the caller's), standardised in place in the solver's dtype."""
    out = X.astype(dtype, copy=False)
    out -= mu.astype(dtype)
    out /= sd.astype(dtype)
    return out


def pearson_r(y: np.ndarray, y_hat: np.ndarray) -> np.ndarray:
    """Per-column Pearson correlation; NaN where either column is constant."""
    return (unit_columns(y) * unit_columns(y_hat)).sum(0)


def unit_columns(a: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Columns centred and scaled to unit norm, so that r is the sum of products; NaN for a constant
    column, whose r is undefined."""
    a = np.asarray(a, dtype=np.float64)
    a = a - a.mean(0)
    norm = np.linalg.norm(a, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a / np.where(norm > 0, norm, np.nan)).astype(dtype, copy=False)


def r2_score(y: np.ndarray, y_hat: np.ndarray) -> np.ndarray:
    """Per-column coefficient of determination on held-out data (1 - SSres/SStot around the
    held-out mean, as scikit-learn defines it); can be negative; NaN for a constant column."""
    y = np.asarray(y, dtype=np.float64)
    ss_res = ((y - y_hat) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1.0 - ss_res / ss_tot
    r2[~(ss_tot > 0)] = np.nan
    return r2


_BACKEND_LOCK = threading.RLock()


@contextlib.contextmanager
def _himalaya_backend(device: str) -> Iterator[Any]:
    """Select himalaya's backend for the device, and restore the previous one afterwards.

    himalaya keeps its backend in a module-global: two threads fitting with different backends
    would switch it under each other's feet, so fits in one process are serialised by a lock.
    (Run layers in parallel as separate processes, as a flow's workers do.)
    """
    from himalaya.backend import get_backend, set_backend

    name, cuda_index = _backend_for(device)
    # Explicit devices fail loudly; "auto"/"cpu" fall back (CUDA -> torch CPU -> numpy, which
    # always works) so that a broken driver or torch build never stops an analysis.
    fallbacks = {"torch_cuda": ["torch", "numpy"], "torch": ["numpy"]}.get(name, []) \
        if str(device).strip().lower() in ("auto", "cpu") else []
    with _BACKEND_LOCK:
        previous = get_backend()
        backend = None
        for i, candidate in enumerate([name, *fallbacks]):
            try:
                backend = set_backend(candidate)
                break
            except Exception as e:
                if i == len(fallbacks):
                    raise EncodingError(f"cannot use device {device!r} (himalaya backend {candidate!r}): {e}") from e
                log.warning("himalaya backend %r unavailable (%s); trying %r", candidate, e, fallbacks[i])
        try:
            if cuda_index is not None:
                import torch

                with torch.cuda.device(cuda_index):
                    yield backend
            else:
                yield backend
        finally:
            set_backend(previous)


def _backend_for(device: str) -> tuple[str, int | None]:
    """himalaya's backend and the CUDA device index for `device`; EncodingError for one that is not there."""
    device = str(device).strip().lower()
    if device == "numpy":
        return "numpy", None
    import torch

    if device == "auto":
        return ("torch_cuda" if torch.cuda.is_available() else "torch"), None
    if device == "cpu":
        return "torch", None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EncodingError(f"device {device!r} asked for, but CUDA is not available here; use device "
                                "auto or cpu")
        _, _, idx = device.partition(":")
        return "torch_cuda", (int(idx) if idx.strip() else None)
    raise EncodingError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or numpy")


def _solver_flops(solver: str, n: int, p: int, t: int, a: int, m: int, e: int, k: int) -> float:
    """Rough multiply-add count of himalaya's RidgeCV ("ridge") or linear KernelRidgeCV ("kernel").

    n training stimuli, p features, t targets, a alphas, k inner folds of m training and e
    validation stimuli. Per fold, primal: SVD of (m, p), one (p, m) solution matrix per alpha, its
    product with the validation features, predictions; kernel: eigh of (m, m), one (e, m) matrix
    per alpha, predictions. Refit on all n (all alphas assumed used): primal (p, n) matrices and
    (p, t) weights per alpha; kernel (n, n) matrices and (n, t) dual weights per alpha.
    """
    if solver == "ridge":
        r = min(m, p)
        fold = 4 * m * p * r + a * p * r * m + a * e * p * m + a * e * m * t
        refit = 4 * n * p * min(n, p) + a * p * min(n, p) * n + a * p * n * t
        return float(k * fold + refit)
    fold = 4 * m**3 + e * m * m + a * e * m * m + a * e * m * t
    refit = n * n * p + 4 * n**3 + a * n**3 + a * n * n * t
    return float(k * fold + refit)


def _solver_batches(width: int, n_in_train: int, n_in_test: int, n_train: int, n_targets: int,
                    n_alphas: int, itemsize: int, batch_bytes: int) -> dict[str, int]:
    """Batch sizes that keep himalaya's intermediates near batch_bytes each.

    Per inner fold it builds (alphas, width, n_in_train) solution matrices and
    (alphas, n_in_test, targets) predictions; the refit builds (alphas, width, targets) weights,
    where width is n_features (primal) or n_train (kernel). Unbatched, 17 alphas x 4096 features x
    8000 stimuli would be 2.2 GB at once, and predictions for 10,000 targets more again.
    """
    per_alpha = itemsize * max(width, n_in_test) * max(n_in_train, n_train)
    n_alphas_batch = int(max(1, min(n_alphas, batch_bytes // max(1, per_alpha))))
    per_target = itemsize * n_alphas_batch * max(n_in_test, width)
    n_targets_batch = int(max(1, min(n_targets, batch_bytes // max(1, per_target))))
    return {"n_alphas_batch": n_alphas_batch, "n_targets_batch": n_targets_batch,
            "n_targets_batch_refit": n_targets_batch}


def _check_alphas(alphas: Any) -> np.ndarray:
    if alphas is None:
        return DEFAULT_ALPHAS.copy()
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if a.size == 0 or not np.isfinite(a).all() or (a <= 0).any():
        raise EncodingError(f"alphas must be positive finite numbers; got {a.tolist()[:8]}")
    # himalaya looks chosen alphas up by binary search: the grid must be sorted and unique
    return np.unique(a)


def _as_2d(X: Any, name: str) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim < 2:
        raise EncodingError(f"{name} must be (n_stimuli, n_features...); got shape {X.shape}")
    X = X.reshape(X.shape[0], -1)
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float32)
    return X


def _as_targets(Y: Any, name: str) -> np.ndarray:
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2:
        raise EncodingError(f"{name} must be (n_stimuli, n_targets); got shape {Y.shape}")
    return Y
