"""Encoding models and RSA (neuropredictor.encode): planted truth, an independent solver
(scikit-learn), alignment and bad input, every neural file format, RSA, outputs, and one run on a
real features store made by the pipeline."""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from scipy.stats import spearmanr
from threadpoolctl import threadpool_limits

from conftest import make_images
from neuropredictor.encode.align import outer_splits
from neuropredictor.errors import NeuroPredictorError
from neuropredictor.encode import (
    DEFAULT_ALPHAS,
    AlignmentWarning,
    EncodeOptions,
    EncodingError,
    NeuralData,
    encode,
    encode_command,
    encode_layer,
    load_neural,
    prepare,
    parse_alphas,
    plot_scores,
    rdm,
    rsa,
    rsa_table,
    save_outputs,
    save_scores,
    summary_table,
)
from neuropredictor.encode.report import describe_split


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: on a shared 2-core CI box, BLAS/torch threads only add spin-waiting
    (a 240x150 fit went from 0.08 s to 4 s with 2 threads next to another busy process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Synthetic features shaped like open_features' result, with a planted layer


N, T = 600, 40
NOISE_SD = np.linspace(0.6, 1.6, T)  # per target: later targets are noisier


def features_dataset(layers: dict[str, np.ndarray], keys: list[str], valid: np.ndarray | None = None) -> xr.Dataset:
    """A Dataset like `open_features` returns: one variable per layer (stimulus, <layer>.dim_i...),
    `valid`, and the `key` coordinate on stimulus."""
    data = {}
    for name, arr in layers.items():
        dims = ("stimulus", *(f"{name}.dim_{i}" for i in range(1, arr.ndim)))
        data[name] = (dims, arr.astype(np.float32))
    n = len(keys)
    data["valid"] = (("stimulus",), np.ones(n, bool) if valid is None else valid)
    return xr.Dataset(data, coords={"key": (("stimulus",), np.array(keys, dtype=object))})


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(42)
    keys = [f"cat{i % 4}/img{i:04d}" for i in range(N)]
    mid = rng.standard_normal((N, 50))  # the planted layer: iid N(0,1) features, so var(x @ w) = |w|^2
    early = np.tanh(mid @ rng.standard_normal((50, 100)) / 5) + 0.8 * rng.standard_normal((N, 100))
    late = rng.standard_normal((N, 4, 4, 4))  # unrelated, conv-shaped
    W = rng.standard_normal((50, T)) / np.sqrt(50)
    signal = mid @ W
    Y = signal + rng.standard_normal((N, T)) * NOISE_SD
    signal_var = (W**2).sum(0)
    theory_r = np.sqrt(signal_var / (signal_var + NOISE_SD**2))
    ds = features_dataset({"early": early, "mid": mid, "late": late}, keys)
    roi = ["V1"] * (T // 2) + ["IT"] * (T // 2)
    neural = NeuralData(Y, keys, targets=[f"vox{i}" for i in range(T)], roi=roi)
    scores = encode(ds, neural, device="cpu")
    return {"ds": ds, "neural": neural, "scores": scores, "theory_r": theory_r, "signal_var": signal_var, "mid": mid, "early": early}


def test_planted_layer_wins_and_r_matches_theory(planted):
    s, theory = planted["scores"], planted["theory_r"]
    assert list(s.layer.values) == ["early", "mid", "late"]  # model (store) order kept
    assert s.r.dims == ("layer", "target") and s.sizes == {"layer": 3, "target": T}
    assert list(s.n_features.values) == [100, 50, 64]
    med = s.r.median("target")
    assert med.idxmax().item() == "mid"
    assert s.attrs["n_train"] == 480 and s.attrs["n_test"] == 120
    r_mid = s.r.sel(layer="mid").values
    # held-out r of the planted layer ~ sqrt(signal / (signal + noise)) ...
    assert abs(r_mid.mean() - theory.mean()) < 0.1, (r_mid.mean(), theory.mean())
    # ... lowered by the estimation error of 50 weights from 480 stimuli: an unbiased (OLS-like)
    # fit adds about noise_var * p / n_train to the prediction's variance; ridge does a bit better
    sv, nv = planted["signal_var"], NOISE_SD**2
    estimated = sv / np.sqrt((sv + nv) * (sv + nv * 50 / 480))
    assert abs(r_mid.mean() - estimated.mean()) < 0.04, (r_mid.mean(), estimated.mean())
    assert r_mid.mean() < theory.mean()
    assert np.corrcoef(r_mid, theory)[0, 1] > 0.7  # per target, the noisier ones score lower
    assert np.all(s.r2.sel(layer="mid").values < r_mid)  # R^2 <= r^2 < r for these
    assert abs(s.r.sel(layer="late").median()) < 0.1  # unrelated layer ~ 0
    table = summary_table(s)
    best = table[table.best].set_index("roi")["layer"].to_dict()
    assert best == {"all": "mid", "V1": "mid", "IT": "mid"}
    # tested, the best is judged above chance, whatever the metric shown (review: R^2 below 0 lost the best)
    low = summary_table(s.assign(r2=s.r2 - 10), metric="r2")
    assert low[low.best].set_index("roi")["layer"].to_dict() == best


def test_untested_a_layer_predicting_nothing_is_the_best_of_nothing():
    # explorer (RSA's twin): without permutations the best was the highest median even when it was below 0
    keys = [f"s{i:03d}" for i in range(80)]
    for seed in range(50):
        rng = np.random.default_rng(seed)
        s = encode(features_dataset({"a": rng.standard_normal((80, 5))}, keys),
                   NeuralData(rng.standard_normal((80, 6)), keys), device="cpu", permutations=0)
        if float(s.r.sel(layer="a").median()) < 0:
            break
    assert float(s.r.sel(layer="a").median()) < 0 and not summary_table(s)["best"].any()


def test_alphas_sensible(planted):
    s = planted["scores"]
    alpha = s.alpha.sel(layer="mid").values
    # well conditioned (n >> p): never at the grid's edges
    assert alpha.min() > DEFAULT_ALPHAS[0] and alpha.max() < DEFAULT_ALPHAS[-1]
    assert set(np.unique(alpha)) <= set(DEFAULT_ALPHAS)
    # noisier targets need more shrinkage (optimal alpha ~ noise var / weight var)
    rho = spearmanr(NOISE_SD, np.log(alpha)).statistic
    assert rho > 0.6, rho
    assert np.median(np.log10(alpha[T // 2:])) > np.median(np.log10(alpha[: T // 2]))


def test_shuffled_keys_score_near_zero(planted):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all keys still match: nothing to report
        s = encode(planted["ds"], planted["neural"].permuted(seed=1), device="cpu")
    assert np.all(np.abs(s.r.median("target").values) < 0.1), s.r.median("target").values


def test_split_is_deterministic_and_order_free(planted):
    ds, nd = planted["ds"], planted["neural"]
    rev = NeuralData(nd.values[::-1].copy(), nd.keys[::-1], nd.targets, nd.roi)
    a = encode(ds, nd, layers="mid", device="cpu")
    b = encode(ds, rev, layers=["mid"], device="cpu")
    np.testing.assert_allclose(a.r.values, b.r.values, atol=1e-6)  # same stimuli held out
    c = encode(ds, nd, layers="mid", device="cpu", seed=3)
    assert not np.allclose(a.r.values, c.r.values)


def _grouped(n_groups=30, per_group=10, width=40, targets=20, seed=5):
    """Stimuli in groups (a concept each) whose features name the group and whose responses are the
    group's own random effect: nothing generalises to a group not trained on, so held-out r is about
    0 when groups are kept whole, and high when a group's other stimuli are in training (leakage)."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    labels = np.repeat([f"concept{g:02d}" for g in range(n_groups)], per_group)
    member = np.repeat(np.arange(n_groups), per_group)
    X = rng.standard_normal((n_groups, width))[member] + 0.1 * rng.standard_normal((n, width))
    Y = rng.standard_normal((n_groups, targets))[member] + 0.3 * rng.standard_normal((n, targets))
    keys = [f"img{i:04d}" for i in rng.permutation(n)]  # key order unrelated to the groups
    return features_dataset({"x": X}, keys), NeuralData(Y, keys), labels


@pytest.mark.parametrize("folds", [None, 5])
def test_groups_keep_held_out_concepts_unseen(folds):
    from dataclasses import replace as dc_replace

    from neuropredictor.encode import prepare

    ds, nd, labels = _grouped()
    leaky = encode(ds, nd, folds=folds, device="cpu", permutations=0)
    grouped_nd = dc_replace(nd, groups=labels)
    grouped = encode(ds, grouped_nd, folds=folds, device="cpu", permutations=0)
    assert float(np.median(leaky.r.values)) > 0.8  # a concept's other images were trained on
    assert abs(float(np.median(grouped.r.values))) < 0.2  # new concepts: nothing to predict them from
    assert grouped.attrs["n_groups"] == 30 and "by group (30 groups)" in str(describe_split(grouped.attrs))
    # outer and inner folds both keep each concept on one side (the inner search chose alphas by group too)
    prep = prepare(ds, grouped_nd, folds=folds, device="cpu")
    label_of = dict(zip(nd.keys, labels))
    rows = np.array([label_of[k] for k in prep.keys], dtype=object)
    for (tr, te), inner in zip(prep.splits, prep.inner):
        assert not set(rows[tr]) & set(rows[te])
        assert len(inner) == 5
        for a, b in inner:
            assert not set(rows[tr][a]) & set(rows[tr][b]) and len(a) + len(b) == len(tr)


def test_group_splits_are_whole_balanced_and_order_free():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 12, 40)  # groups of unequal size
    labels = np.repeat([f"g{i}" for i in range(40)], sizes).tolist()
    keys = [f"k{i}" for i in range(len(labels))]
    n = len(keys)
    five = outer_splits(keys, None, 0.2, 5, 0, labels)
    tests = [te for _, te in five["splits"]]
    assert sorted(np.concatenate(tests).tolist()) == list(range(n))  # each stimulus held out once
    for tr, te in five["splits"]:
        assert not {labels[i] for i in tr} & {labels[i] for i in te}
        assert abs(len(te) - n / 5) <= sizes.max()
    random = outer_splits(keys, None, 0.2, None, 0, labels)
    (tr, te), = random["splits"]
    assert not {labels[i] for i in tr} & {labels[i] for i in te} and abs(len(te) - 0.2 * n) <= sizes.max()
    # rows in another order: the same stimuli held out
    order = rng.permutation(n)
    again = outer_splits([keys[i] for i in order], None, 0.2, None, 0, [labels[i] for i in order])
    assert {keys[order[i]] for i in again["splits"][0][1]} == {keys[i] for i in te}
    assert outer_splits(keys, None, 0.2, None, 1, labels)["splits"][0][1].tolist() != te.tolist()  # seed matters


def test_with_groups_the_chance_tests_move_whole_groups(caplog):
    """Statistics review: stimuli of one group share responses the features do not predict (a concept's offset),
    and their features look alike; shuffled one by one, the shared part met unrelated predictions: 23-31 % of pure
    noise below 0.05 here. Whole groups moved onto groups of their size keep that part together."""
    from neuropredictor.encode.chance import exchanged, lone_groups

    rng = np.random.default_rng(0)
    G, per, T = 40, 5, 100
    labels = [f"g{i}" for i in range(G) for _ in range(per)]
    keys = [f"s{i:03d}" for i in range(G * per)]
    X = np.repeat(rng.standard_normal((G, 32)), per, 0) + 0.5 * rng.standard_normal((G * per, 32))
    Y = np.repeat(rng.standard_normal((G, T)), per, 0) + rng.standard_normal((G * per, T))
    s = encode(features_dataset({"a": X}, keys), NeuralData(Y, keys, groups=labels), device="cpu", folds=5,
               permutations=200)
    assert np.mean(s["p"].sel(layer="a").values <= 0.05) <= 0.08

    sizes = ["a", "a", "b", "b", "c", "c", "c", "d", "d", "d", "e"]
    orders = exchanged(np.random.default_rng(1), sizes, 500)
    for order in orders[:50]:
        for g in set(sizes):  # a group's places receive one group's stimuli, of its size, in any order
            got = {sizes[i] for i in order[[i for i, x in enumerate(sizes) if x == g]]}
            assert len(got) == 1 and sizes.count(got.pop()) == sizes.count(g)
    assert len({tuple(o) for o in orders}) > 100  # and they move: groups swap, stimuli within them too
    assert lone_groups(["a", "b", "b"]) and not lone_groups(sizes)
    # groups of sizes no other group has cannot move: said once, as the p-values come out larger
    labels = [f"g{i}" for i in range(20) for _ in range(i + 3)]
    keys = [f"s{i:03d}" for i in range(len(labels))]
    with caplog.at_level("WARNING", logger="neuropredictor.encode.run"):
        encode(features_dataset({"a": rng.standard_normal((len(keys), 8))}, keys),
               NeuralData(rng.standard_normal((len(keys), 3)), keys, groups=labels), device="cpu", permutations=20)
    assert len([r for r in caplog.records if "a size no other group there has" in r.message]) == 1


def test_groups_refuse_a_straddling_split_and_too_few_groups():
    keys = [f"k{i}" for i in range(40)]
    labels = [f"g{i // 10}" for i in range(40)]
    train = np.arange(40) % 10 != 0  # the first stimulus of every group is a test stimulus
    with pytest.raises(EncodingError, match=r"4 groups have stimuli on both sides of the given split"):
        outer_splits(keys, train, 0.2, None, 0, labels)
    whole = np.array([g != "g3" for g in labels])
    assert outer_splits(keys, whole, 0.2, None, 0, labels)["n_test"] == 10
    with pytest.raises(EncodingError, match=r"fall in 4 groups, fewer than the 5 folds"):
        outer_splits(keys, None, 0.2, 5, 0, labels)
    with pytest.raises(EncodingError, match="3 group labels for 40 rows"):
        NeuralData(np.zeros((40, 2)), keys, groups=["a", "b", "c"])


def test_outer_folds_and_ceiling(planted):
    ds, nd = planted["ds"], planted["neural"]
    ceiling = np.full(T, 0.8)
    ceiling[0] = 0.0  # unusable ceiling -> NaN, not inf
    s = encode(ds, replace(nd, ceiling=ceiling), layers="mid,late", device="cpu", folds=4)
    assert s.attrs["split"] == "4-fold" and s.attrs["n_test"] == N // 4
    np.testing.assert_allclose(s.r_normalized.values[:, 1:], s.r.values[:, 1:] / 0.8)
    assert np.isnan(s.r_normalized.values[:, 0]).all()
    assert s.r.median("target").idxmax().item() == "mid"
    # a split that comes with the data is used as is
    train = np.ones(N, bool)
    train[::3] = False
    given = NeuralData(nd.values, nd.keys, train=train)
    s = encode(ds, given, layers="mid", device="cpu")
    assert s.attrs["split"] == "given" and s.attrs["n_test"] == N // 3
    with pytest.raises(EncodingError, match="not both"):
        encode(ds, given, layers="mid", device="cpu", folds=3)


def test_devices():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((60, 8)), rng.standard_normal((60, 3))
    if not torch.cuda.is_available():
        with pytest.raises(EncodingError, match="CUDA is not available"):
            encode_layer(X[:40], Y[:40], X[40:], Y[40:], device="cuda")
    with pytest.raises(EncodingError, match="unknown device"):
        encode_layer(X[:40], Y[:40], X[40:], Y[40:], device="tpu")
    from himalaya.backend import get_backend

    before = get_backend().name
    res = encode_layer(X[:40], Y[:40], X[40:], Y[40:], device="auto")
    assert res["backend"] == ("torch_cuda" if torch.cuda.is_available() else "torch")
    assert get_backend().name == before  # the global backend is restored


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 64))
    Y = X[:, :8] @ rng.standard_normal((8, 50)) + rng.standard_normal((300, 50))
    a = encode_layer(X[:240], Y[:240], X[240:], Y[240:], device="cuda", dtype="float64")
    b = encode_layer(X[:240], Y[:240], X[240:], Y[240:], device="cpu", dtype="float64")
    assert a["backend"] == "torch_cuda"
    np.testing.assert_allclose(a["r"], b["r"], atol=1e-6)
    np.testing.assert_array_equal(a["alpha"], b["alpha"])


# ---------------------------------------------------------------------------------------------
# Agreement with scikit-learn


def _standardise(Xtr, Xte):
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd[sd == 0] = 1
    return (Xtr - mu) / sd, (Xte - mu) / sd


@pytest.mark.parametrize("n_features,device", [(20, "cpu"), (20, "numpy"), (150, "cpu")])
def test_matches_sklearn_ridgecv_leave_one_out(n_features, device):
    """Same grid, same standardisation, same inner CV (leave-one-out, which sklearn's RidgeCV
    computes in closed form with alpha_per_target): same alphas, and r/R^2 within 1e-4. 150
    features > 60 training stimuli exercises the kernel solver."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import LeaveOneOut

    rng = np.random.default_rng(n_features)
    n, t = 80, 12
    X = rng.standard_normal((n, n_features))
    Y = X @ rng.standard_normal((n_features, t)) * 0.3 + rng.standard_normal((n, t)) * np.linspace(0.5, 4, t) + 5.0
    tr, te = np.arange(60), np.arange(60, n)
    alphas = np.logspace(-1, 4, 11)
    ours = encode_layer(X[tr], Y[tr], X[te], Y[te], alphas, cv=LeaveOneOut(), dtype="float64", device=device,
                        return_predictions=True)
    assert ours["solver"] == ("kernel" if n_features > 60 else "ridge")
    Xtr, Xte = _standardise(X[tr], X[te])
    ref = RidgeCV(alphas=alphas, alpha_per_target=True, fit_intercept=True).fit(Xtr, Y[tr])
    pred = ref.predict(Xte)
    np.testing.assert_allclose(ours["alpha"], ref.alpha_, rtol=1e-12)
    ref_r = np.array([np.corrcoef(Y[te][:, j], pred[:, j])[0, 1] for j in range(t)])
    np.testing.assert_allclose(ours["r"], ref_r, atol=1e-4)
    np.testing.assert_allclose(ours["r2"], r2_score(Y[te], pred, multioutput="raw_values"), atol=1e-4)
    np.testing.assert_allclose(ours["predictions"], pred, rtol=1e-6, atol=1e-6)
    assert len(set(ours["alpha"].tolist())) > 1  # the comparison covers per-target choices


def test_matches_sklearn_ridge_fixed_alpha_float32():
    """Default float32 path, one alpha (no selection): predictions of sklearn's Ridge."""
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(7)
    X = rng.standard_normal((120, 30)).astype(np.float32)
    Y = X @ rng.standard_normal((30, 8)) + rng.standard_normal((120, 8))
    ours = encode_layer(X[:90], Y[:90], X[90:], Y[90:], [10.0], return_predictions=True, device="cpu")
    Xtr, Xte = _standardise(X[:90].astype(np.float64), X[90:].astype(np.float64))
    pred = Ridge(alpha=10.0).fit(Xtr, Y[:90]).predict(Xte)
    np.testing.assert_allclose(ours["predictions"], pred, atol=1e-3)
    ref_r = np.array([np.corrcoef(Y[90:, j], pred[:, j])[0, 1] for j in range(8)])
    np.testing.assert_allclose(ours["r"], ref_r, atol=1e-4)


def _signal_and_noise_rois(n=300, seed=3):
    """Layer b carries ROI V1's signal; ROI IT is pure noise, unrelated to every layer."""
    rng = np.random.default_rng(seed)
    keys = [f"s{i:03d}" for i in range(n)]
    feats = {name: rng.standard_normal((n, 20)) for name in ("a", "b", "c")}
    v1 = feats["b"] @ rng.standard_normal((20, 20)) / np.sqrt(20) + rng.standard_normal((n, 20))
    it = rng.standard_normal((n, 20))
    return features_dataset(feats, keys), NeuralData(np.hstack([v1, it]), keys, roi=["V1"] * 20 + ["IT"] * 20)


def test_chance_test_names_a_best_layer_only_above_chance(tmp_path):
    """Issue 12, item 8: per-ROI scores with a permutation chance test; no best layer for an ROI at
    chance; the test survives saving; the split is described as it was made."""
    ds, nd = _signal_and_noise_rois()
    s = encode(ds, nd, device="cpu", folds=5, alphas="logspace:-1:4:6")
    assert s.attrs["permutations"] == 1000 and set(json.loads(s.attrs["chance"])) == {"all", "V1", "IT"}
    table = summary_table(s).set_index(["roi", "layer"])
    assert table.loc[("V1", "b"), "above_chance"] and table.loc[("V1", "b"), "best"]
    assert table.loc[("V1", "b"), "p_value"] == pytest.approx(1 / 1001)
    it = table.loc["IT"]
    assert not it["above_chance"].any() and not it["best"].any() and (it["p_value"] > 0.05).all()
    # the null's scale: a fold's r under the null has sd ~ 1/sqrt(59), the median of 20 independent
    # targets 1.2533 x that / sqrt(20). Its 95th percentile lies between that of 5 independent folds
    # (~0.027) and that of perfectly dependent ones (~0.060): the folds are paired by rank of median r
    assert 0.035 < it["chance"].mean() < 0.06
    # above chance means p <= 0.05, also at the edge where the interpolated 95th percentile says otherwise
    edge = json.loads(s.attrs["chance"])
    edge["V1"]["chance"][1], edge["V1"]["p_value"][1] = table.loc[("V1", "b"), "median"] - 0.01, 0.06
    at_edge = summary_table(s.assign_attrs(chance=json.dumps(edge))).set_index(["roi", "layer"])
    assert not at_edge.loc[("V1", "b"), "above_chance"]
    assert (at_edge["above_chance"] == (at_edge["p_holm"] <= 0.05)).all()
    out = str(tmp_path / "scores.zarr")
    summary = save_outputs(s, EncodeOptions(features="unused", neural="unused", out=out))
    pd.testing.assert_frame_equal(summary_table(xr.open_zarr(out)), summary_table(s))
    assert summary["best_layer_per_roi"] == {"V1": "b", "IT": None}
    assert summary["above_chance"]["IT"] == {"a": False, "b": False, "c": False}
    assert summary["rois"]["V1"]["b"] > 0.3 and summary["split"] == "5-fold CV, 300 stimuli"
    assert Path(summary["plot"]).stat().st_size > 5000


def test_alignment_reported_once(caplog):
    """Issue 12, item 8: the alignment message was printed twice (a log record and a warning)."""
    keys, A, Y = _small(80)
    ds = features_dataset({"a": A, "b": A[:, :5]}, keys)
    with caplog.at_level(logging.INFO), pytest.warns(AlignmentWarning) as rec:
        encode(ds, NeuralData(Y[:70], keys[:70]), device="cpu", inner_folds=3, permutations=0)
    said = [str(w.message) for w in rec] + [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "10 features only" in m]) == 1, said


# ---------------------------------------------------------------------------------------------
# Alignment and bad input


def _small(n=60, seed=0):
    rng = np.random.default_rng(seed)
    keys = [f"img{i:03d}" for i in range(n)]
    A = rng.standard_normal((n, 10))
    Y = A @ rng.standard_normal((10, 5)) + 0.5 * rng.standard_normal((n, 5))
    return keys, A, Y


def test_no_overlap_is_a_clear_error():
    keys, A, Y = _small()
    ds = features_dataset({"a": A}, keys)
    with pytest.raises(EncodingError, match="no stimulus key is in both.*would match after dropping"):
        encode(ds, NeuralData(Y, [f"stim/{k}.jpg" for k in keys]), device="cpu")
    # numbered images stored zero-padded, numbers in the neural data
    numbered = features_dataset({"a": A}, [f"{i:04d}" for i in range(len(keys))])
    with pytest.raises(EncodingError, match=r"53 neural keys would match if zero-padded .*'7' is stored as '0007'"):
        encode(numbered, NeuralData(Y, [str(i) for i in range(len(keys))][7:] + ["a", "b", "c", "d", "e", "f", "g"]),
               device="cpu")
    # bytes keys from Python (h5py, MATLAB) are text: str(b"k") was "b'k'", matching nothing
    assert NeuralData(Y, [k.encode() for k in keys]).keys == keys


def test_unmatched_invalid_and_nan_rows_reported_and_dropped():
    keys, A, Y = _small(80)
    valid = np.ones(80, bool)
    valid[[3, 4]] = False  # undecodable images: NaN features
    A[[3, 4]] = np.nan
    ds = features_dataset({"a": A}, keys, valid)
    Y = Y.copy()
    Y[[10, 11, 12], 1] = np.nan  # missing measurements of one target: the stimuli stay for the others
    Y[13, :4] = np.nan  # a stimulus measured for no target
    Y[:, 4] = np.nan  # a dead target
    nkeys = list(keys)
    nkeys[70:] = [f"extra{i}" for i in range(10)]  # in the neural data only; img070.. in features only
    with pytest.warns(AlignmentWarning, match="dropped") as rec:
        s = encode(ds, NeuralData(Y, nkeys), device="cpu", inner_folds=3)
    msg = str(rec[0].message)
    assert "'extra0'" in msg and "'img003'" in msg and "'img013'" in msg and "'img010'" not in msg
    assert s.attrs["dropped_features_only"] == 10 and s.attrs["dropped_neural_only"] == 10
    assert s.attrs["dropped_invalid_features"] == 2 and s.attrs["dropped_nan_neural"] == 1
    assert s.attrs["dropped_nan_targets"] == 1 and s.attrs["target_sets"] == 2
    assert s.attrs["n_stimuli"] == 80 - 10 - 2 - 1
    assert s.n_measured.values.tolist() == [67, 64, 67, 67, 0]
    report = json.loads(s.attrs["alignment"])
    assert report["dropped"]["invalid_features"]["examples"] == ["img003", "img004"]
    assert np.isnan(s.r.values[0, 4]) and np.isfinite(s.r.values[0, :4]).all()
    assert (s.r.values[0, :4] > 0.5).all()  # still the right rows: alignment by key worked
    assert s.attrs["dropped_not_extracted"] == 0

    # a store still being extracted: rows without data have no key; their stimuli are said to be why
    keys_partial = [k if i < 60 else "" for i, k in enumerate(keys)]
    valid_partial = valid & (np.arange(80) < 60)
    with pytest.warns(AlignmentWarning, match=r"20 neural only or not extracted yet \(e\.g\. 'img060'.*20 not "
                                              r"extracted \(features rows without data yet") as rec:
        s = encode(features_dataset({"a": A}, keys_partial, valid_partial), NeuralData(Y, nkeys), device="cpu",
                   inner_folds=3)
    assert s.attrs["dropped_not_extracted"] == 20


def test_all_nan_is_an_error():
    keys, A, Y = _small()
    with pytest.raises(EncodingError, match="every target .* NaN"):
        encode(features_dataset({"a": A}, keys), NeuralData(np.full_like(Y, np.nan), keys), device="cpu")


def test_shape_and_duplicate_errors(tmp_path):
    keys, A, Y = _small()
    with pytest.raises(EncodingError, match="59 stimulus keys for 60 rows"):
        NeuralData(Y, keys[:-1])
    np.save(tmp_path / "y.npy", Y)
    (tmp_path / "keys.txt").write_text("\n".join(keys[:50]) + "\n")
    with pytest.raises(EncodingError, match="50 keys for 60 rows"):
        load_neural(tmp_path / "y.npy", keys=tmp_path / "keys.txt")
    with pytest.raises(EncodingError, match="no stimulus keys"):
        load_neural(tmp_path / "y.npy")
    with pytest.raises(EncodingError, match="more than once.*'img000'"):
        NeuralData(Y, keys[:1] + keys[:1] + keys[1:-1])
    with pytest.raises(EncodingError, match="features store has 1 keys on more than one row"):
        encode(features_dataset({"a": A}, keys[:-1] + keys[:1]), NeuralData(Y, keys), device="cpu")
    with pytest.raises(EncodingError, match="not in the features store; it has a"):
        encode(features_dataset({"a": A}, keys), NeuralData(Y, keys), layers="b", device="cpu")
    with pytest.raises(EncodingError, match="ROI labels for 5 targets"):
        NeuralData(Y, keys, roi=["V1"])
    with pytest.raises(EncodingError, match="split leaves 10 training and 2 test"):
        encode(features_dataset({"a": A[:12]}, keys[:12]), NeuralData(Y[:12], keys[:12]), device="cpu")
    with pytest.raises(EncodingError, match="alphas"):
        parse_alphas("1,-2")
    np.testing.assert_allclose(parse_alphas("logspace:-2:6:17"), DEFAULT_ALPHAS)


# ---------------------------------------------------------------------------------------------
# File formats


def _check(nd: NeuralData, keys, Y, targets=None):
    assert nd.keys == keys
    np.testing.assert_allclose(nd.values, Y)
    if targets is not None:
        assert nd.targets == targets


def test_load_npy_with_key_file(tmp_path):
    keys, _, Y = _small()
    np.save(tmp_path / "y.npy", Y)
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n\n")  # trailing blank lines are no keys
    (tmp_path / "test.txt").write_text("img001\nimg005\n")
    nd = load_neural(str(tmp_path / "y.npy"), keys=str(tmp_path / "keys.txt"), split=str(tmp_path / "test.txt"))
    _check(nd, keys, Y, [f"t{i}" for i in range(5)])
    assert nd.train.sum() == 58 and not nd.train[1] and not nd.train[5]


def test_load_npz_with_keys_roi_ceiling_split(tmp_path):
    keys, _, Y = _small()
    is_test = np.zeros(60, bool)
    is_test[::5] = True
    np.savez(tmp_path / "y.npz", betas=Y, keys=np.array(keys), roi=np.array(["V1", "V1", "V4", "IT", "IT"]),
             noise_ceiling=np.linspace(0.5, 0.9, 5), is_test=is_test, other=np.zeros((3, 3)))
    nd = load_neural(tmp_path / "y.npz", split="is_test")
    _check(nd, keys, Y)
    assert nd.roi == ["V1", "V1", "V4", "IT", "IT"]
    np.testing.assert_allclose(nd.ceiling, np.linspace(0.5, 0.9, 5))
    np.testing.assert_array_equal(nd.train, ~is_test)  # a column named *test*: True = test


def test_options_naming_what_is_not_there_fail_early_and_say_so(tmp_path):
    keys, A, Y = _small()
    np.savez(tmp_path / "y.npz", betas=Y, keys=np.array(keys), roi=np.array(["V1", "V1", "V4", "IT", "IT"]))
    # was "file not found: nope", as if a file had been asked for
    with pytest.raises(EncodingError, match=r"roi 'nope' is neither a column/array/variable of .*y\.npz \(it has "
                                            r"'keys', 'roi'\) nor a file"):
        load_neural(tmp_path / "y.npz", roi="nope")
    # was a bare ValueError (could not convert string to float)
    with pytest.raises(EncodingError, match=r"ceiling 'roi' must hold numbers.*ROI labels go to roi="):
        load_neural(tmp_path / "y.npz", ceiling="roi")
    for name in ("absent.nc", "absent.zarr"):  # was a FileNotFoundError with a traceback
        with pytest.raises(EncodingError, match=rf"file not found: .*{name}"):
            load_neural(tmp_path / name)
    with pytest.warns(AlignmentWarning, match=r"2 targets have a noise ceiling that is not positive.*'t1', 't3'"):
        NeuralData(Y, keys, ceiling=[0.5, 0.0, 0.7, np.nan, 0.6])
    # a device that is not there: refused before any layer is fitted, not in each of them
    if not torch.cuda.is_available():
        with pytest.raises(EncodingError, match="CUDA is not available here; use device auto or cpu"):
            prepare(features_dataset({"a": A}, keys), NeuralData(Y, keys), device="cuda")
    Y = Y.copy()
    Y[:, 2] = 1.0
    with pytest.warns(AlignmentWarning, match=r"1 targets cannot be scored.*constant.*'t2'"):
        s = encode(features_dataset({"a": A}, keys), NeuralData(Y, keys), device="cpu", inner_folds=3)
    assert s.attrs["dropped_constant_targets"] == 1 and np.isnan(s.r.values[0, 2])


def test_an_roi_named_like_the_group_of_all_targets_is_refused():
    # Scores are summarised over "all" targets, then each ROI: an ROI labelled "all" took that group's name,
    # and the all-targets rows got the ROI's chance level (above_chance decided against the wrong null).
    keys, _, Y = _small()
    with pytest.raises(EncodingError, match="ROI is labelled 'all'.*rename"):
        NeuralData(Y, keys, roi=["V1", "V1", "all", "all", "all"])


def test_load_npz_with_bytes_or_object_keys(tmp_path):
    # Keys from h5py or MATLAB are bytes: they read as "b'img1'" and matched nothing. Keys from a pandas
    # column are objects: np.load refused them with numpy's words only.
    keys, _, Y = _small()
    np.savez(tmp_path / "bytes.npz", betas=Y, keys=np.array(keys, dtype="S"), roi=np.array([b"V1"] * 5))
    nd = load_neural(tmp_path / "bytes.npz")
    _check(nd, keys, Y)
    assert nd.roi == ["V1"] * 5
    np.savez(tmp_path / "objects.npz", betas=Y, keys=np.array(keys, dtype=object))
    with pytest.raises(EncodingError, match="'keys' holds Python objects.*dtype=str"):
        load_neural(tmp_path / "objects.npz")


def test_load_csv_with_key_column(tmp_path):
    keys, _, Y = _small()
    keys = [f"{i:03d}" for i in range(60)]  # digit keys must stay strings ("001", not 1)
    df = pd.DataFrame(Y, columns=[f"v{i}" for i in range(5)])
    df.insert(0, "stim", keys)
    df["fold"] = ["test" if i % 4 == 0 else "train" for i in range(60)]
    df.to_csv(tmp_path / "y.csv", index=False)
    nd = load_neural(tmp_path / "y.csv", key_column="stim", split="fold")
    _check(nd, keys, Y, [f"v{i}" for i in range(5)])
    assert nd.train.sum() == 45
    with pytest.raises(EncodingError, match="no key column 'key'"):
        load_neural(tmp_path / "y.csv")


def test_a_boolean_split_points_the_way_its_name_says_or_is_refused(tmp_path):
    # True was "train" unless the name held "test": a `heldout` column trained on the held-out stimuli
    keys, _, Y = _small()
    held = np.arange(60) % 5 == 0  # 12 held-out stimuli
    for name in ("heldout", "is_val", "isTest", "holdout", "hold_out", "testset", "is_evaluation"):
        np.savez(tmp_path / "y.npz", data=Y, key=np.array(keys), **{name: held})
        assert load_neural(tmp_path / "y.npz", split=name).train.sum() == 48, name
    for name in ("is_train", "trainval"):
        np.savez(tmp_path / "y.npz", data=Y, key=np.array(keys), **{name: ~held})
        assert load_neural(tmp_path / "y.npz", split=name).train.sum() == 48
    for name in ("split", "fold", "test_train"):
        np.savez(tmp_path / "y.npz", data=Y, key=np.array(keys), **{name: held})
        with pytest.raises(EncodingError, match=f"split '{name}' holds True/False, but its name does not say"):
            load_neural(tmp_path / "y.npz", split=name)
    with pytest.warns(AlignmentWarning, match="trains on 12 stimuli and tests on 48: check which way"):
        outer_splits(keys, held, 0.2, None, 0)


def test_load_groups_from_a_column_an_array_or_a_file(tmp_path):
    keys, _, Y = _small()
    labels = [f"concept{i % 7}" for i in range(60)]
    df = pd.DataFrame(Y, columns=[f"v{i}" for i in range(5)])
    df.insert(0, "key", keys)
    df["concept"] = labels
    df.to_csv(tmp_path / "y.csv", index=False)
    nd = load_neural(tmp_path / "y.csv", groups="concept")  # a text column, not a target
    _check(nd, keys, Y, [f"v{i}" for i in range(5)])
    assert nd.groups == labels
    np.savez(tmp_path / "y.npz", data=Y, key=np.array(keys), concept=np.array(labels))
    assert load_neural(tmp_path / "y.npz", groups="concept").groups == labels
    (tmp_path / "groups.txt").write_text("\n".join(labels) + "\n")
    assert load_neural(tmp_path / "y.npz", groups=str(tmp_path / "groups.txt")).groups == labels
    with pytest.raises(EncodingError, match="groups 'nope' is neither a column"):
        load_neural(tmp_path / "y.npz", groups="nope")
    assert EncodeOptions(features="f", neural=str(tmp_path / "y.csv"), out="o",
                         groups="concept").read_neural().groups == labels


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_load_netcdf_and_zarr_with_coordinate(tmp_path, suffix):
    keys, _, Y = _small()
    da = xr.DataArray(Y, dims=("presentation", "neuroid"),
                      coords={"stimulus_id": ("presentation", np.array(keys, dtype=object)),
                              "neuroid": np.array([f"n{i}" for i in range(5)], dtype=object),
                              "roi": ("neuroid", np.array(["V4", "V4", "IT", "IT", "IT"], dtype=object))})
    ds = da.to_dataset(name="rates")
    path = tmp_path / f"y{suffix}"
    if suffix == ".nc":
        ds.to_netcdf(path)
    else:
        ds.to_zarr(path, zarr_format=3, consolidated=False)
    nd = load_neural(path, key_column="stimulus_id")
    _check(nd, keys, Y, [f"n{i}" for i in range(5)])
    assert nd.roi == ["V4", "V4", "IT", "IT", "IT"]
    # keys as the first dimension's own coordinate work too
    ds2 = xr.DataArray(Y, dims=("stimulus", "voxel"), coords={"stimulus": np.array(keys, dtype=object)}).to_dataset(name="y")
    path2 = tmp_path / f"z{suffix}"
    ds2.to_netcdf(path2) if suffix == ".nc" else ds2.to_zarr(path2, zarr_format=3, consolidated=False)
    _check(load_neural(path2), keys, Y)

    # stored targets x stimuli and square: rows were voxels labelled with stimulus keys, and nothing said so
    square = np.random.default_rng(1).standard_normal((5, 5))
    for dims, coords in ((("voxel", "stimulus"), {"stimulus": np.array(keys[:5], dtype="S")}),
                         (("voxel", "image"), {"key": ("image", np.array(keys[:5], dtype=object))}),
                         (("neuroid", "presentation"), {"neuroid": [f"n{i}" for i in range(5)]})):
        ds3 = xr.DataArray(square, dims=dims, coords=coords).to_dataset(name="y")
        path3 = tmp_path / f"t{suffix}"
        ds3.to_netcdf(path3) if suffix == ".nc" else ds3.to_zarr(path3, zarr_format=3, consolidated=False, mode="w")
        nd = load_neural(path3, keys=keys[:5] if dims[0] == "neuroid" else None)
        np.testing.assert_array_equal(nd.values, square.T)
        assert nd.keys == keys[:5]  # bytes keys as text: they read "b'img000'" and matched nothing


def test_csv_index_and_flag_columns_are_not_targets(tmp_path):
    # df.to_csv() writes the row index as a column without a header ("Unnamed: 0"), and a True/False column
    # is numeric to pandas: both were scored as targets
    keys, _, Y = _small()
    df = pd.DataFrame(Y, columns=[f"v{i}" for i in range(5)])
    df.insert(0, "key", keys)
    df.to_csv(tmp_path / "indexed.csv")
    with pytest.raises(EncodingError, match=r"columns 'Unnamed: 0' have no header.*index=False"):
        load_neural(tmp_path / "indexed.csv")
    df["is_test"] = np.arange(60) % 5 == 0
    df.to_csv(tmp_path / "flag.csv", index=False)
    with pytest.raises(EncodingError, match=r"columns 'is_test' hold True/False.*split="):
        load_neural(tmp_path / "flag.csv")
    assert load_neural(tmp_path / "flag.csv", split="is_test").targets == [f"v{i}" for i in range(5)]
    # the same flag written as 0/1, and an identifier column (NSD's nsd_id): whole numbers, scored as targets
    df["is_test"] = (np.arange(60) % 5 == 0).astype(int)
    df.to_csv(tmp_path / "zero_one.csv", index=False)
    with pytest.raises(EncodingError, match=r"columns 'is_test' hold True/False \(or 0/1\).*split="):
        load_neural(tmp_path / "zero_one.csv")
    df = df.drop(columns="is_test")
    df["nsd_id"] = np.arange(60) * 7 + 3
    df.to_csv(tmp_path / "ids.csv", index=False)
    with pytest.raises(EncodingError, match=r"columns 'nsd_id' look like identifiers.*key_column="):
        load_neural(tmp_path / "ids.csv")
    df["nsd_id"] = df["nsd_id"] * 1.5  # not whole numbers: responses after all
    df.to_csv(tmp_path / "ids.csv", index=False)
    assert load_neural(tmp_path / "ids.csv").targets[-1] == "nsd_id"


def test_neural_files_that_are_easy_to_misread_are_named(tmp_path):
    keys, _, Y = _small()
    # a split the user did not name is not used, but pointed out
    np.savez(tmp_path / "n.npz", data=Y, key=np.array(keys), is_test=np.arange(60) % 5 == 0)
    with pytest.warns(AlignmentWarning, match=r"'is_test'.*looks like a split.*--split is_test"):
        assert load_neural(tmp_path / "n.npz").train is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_neural(tmp_path / "n.npz", split="is_test").train.sum() == 48
    # stored targets x stimuli
    np.savez(tmp_path / "t.npz", data=Y.T, key=np.array(keys))
    with pytest.raises(EncodingError, match="transpose it"):
        load_neural(tmp_path / "t.npz")
    # a ceiling in percent (or R²) is not in units of r
    with pytest.warns(AlignmentWarning, match=r"noise ceiling above 1 \(up to 36\).*units of r"):
        NeuralData(Y, keys, ceiling=np.full(5, 36.0))


def test_inf_in_the_neural_data_drops_the_row_and_a_fold_without_r_is_left_out():
    keys, A, Y = _small(80)
    ds = features_dataset({"a": A}, keys)
    Y = Y.copy()
    Y[7] = np.inf  # crashed the run, naming NaN and a cleaning that was not done
    with pytest.warns(AlignmentWarning, match=r"1 nan neural \(e.g. 'img007'\)"):
        s = encode(ds, NeuralData(Y, keys), device="cpu", inner_folds=3)
    assert s.attrs["dropped_nan_neural"] == 1 and np.isfinite(s.r.values).all()
    # a target constant on one fold's test stimuli has no r there: it was NaN overall, left out of every median
    with pytest.warns(AlignmentWarning):
        three = encode(ds, NeuralData(Y, keys), device="cpu", inner_folds=3, folds=3)
    (_, te), *_ = outer_splits([k for i, k in enumerate(keys) if i != 7], None, 0.2, 3, 0)["splits"]
    rows = np.array([i for i in range(80) if i != 7])[te]
    Y[rows, 0] = 1.0
    with pytest.warns(AlignmentWarning):
        flat = encode(ds, NeuralData(Y, keys), device="cpu", inner_folds=3, folds=3)
    assert np.isfinite(flat.r.values[0, 0]) and flat.r.values[0, 0] != three.r.values[0, 0]


def _two_sessions(n=120, seed=3):
    """Targets 0-2 recorded on stimuli 0-79 (session a), 3-5 on 40-119 (session b; inf, not NaN, marks the
    others): one planted linear map, noise of its own per session."""
    rng = np.random.default_rng(seed)
    keys = [f"img{i:03d}" for i in range(n)]
    A = rng.standard_normal((n, 12))
    Y = A @ rng.standard_normal((12, 6)) + 0.7 * rng.standard_normal((n, 6))
    Y[80:, :3] = np.nan
    Y[:40, 3:] = np.inf
    return keys, A, Y


def test_targets_measured_on_different_stimuli_are_each_fitted_on_theirs():
    keys, A, Y = _two_sessions()
    ds = features_dataset({"a": A}, keys)
    train = np.arange(120) % 5 != 0
    s = encode(ds, NeuralData(Y, keys, train=train), device="cpu", inner_folds=3, permutations=0)
    assert s.attrs["n_stimuli"] == 120 and s.attrs["target_sets"] == 2 and s.attrs["dropped_nan_neural"] == 0
    assert s.n_measured.values.tolist() == [80, 80, 80, 80, 80, 80]
    # the same as scoring each session from a file of its own (the shared split cut to its stimuli)
    for rows, cols in ((slice(0, 80), slice(0, 3)), (slice(40, 120), slice(3, 6))):
        alone = encode(features_dataset({"a": A[rows]}, keys[rows]), NeuralData(Y[rows, cols], keys[rows],
                       train=train[rows]), device="cpu", inner_folds=3, permutations=0)
        np.testing.assert_allclose(s.r.values[0, cols], alone.r.values[0], rtol=1e-6)
        np.testing.assert_array_equal(s.alpha.values[0, cols], alone.alpha.values[0])
    assert (s.r.values > 0.6).all()

    # K folds: each fold's fit of a session is on the fold's stimuli of that session
    five = encode(ds, NeuralData(Y, keys), device="cpu", inner_folds=3, folds=4, permutations=0)
    splits = outer_splits(keys, None, 0.2, 4, 0)["splits"]
    for rows, cols in ((np.arange(0, 80), slice(0, 3)), (np.arange(40, 120), slice(3, 6))):
        r = []
        for tr, te in splits:
            tr, te = np.intersect1d(tr, rows), np.intersect1d(te, rows)
            r.append(encode_layer(A[tr], Y[tr, cols], A[te], Y[te, cols], n_folds=3, device="cpu")["r"])
        np.testing.assert_allclose(five.r.values[0, cols], np.mean(r, axis=0), rtol=1e-5)


def test_a_layer_reports_every_solver_its_fits_used():
    # the automatic choice goes by each fit's shape: 240 stimuli of 60 features fit primal, a set of 40
    # stimuli through its kernel; the layer named only its last fit's solver
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(240)]
    A = rng.standard_normal((240, 60))
    Y = A[:, :4] @ rng.standard_normal((4, 4)) + rng.standard_normal((240, 4))
    Y[40:, 2:] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = encode(features_dataset({"a": A}, keys), NeuralData(Y, keys), device="cpu", inner_folds=3, permutations=0)
        alone = [encode(features_dataset({"a": A[rows]}, keys[rows]), NeuralData(Y[rows][:, cols], keys[rows]),
                        device="cpu", inner_folds=3, permutations=0).solver.values[0]
                 for rows, cols in ((slice(None), slice(0, 2)), (slice(0, 40), slice(2, 4)))]
    assert sorted(alone) == ["kernel", "ridge"] and s.solver.values.tolist() == ["kernel+ridge"]


def test_the_chance_test_shuffles_each_set_of_targets_on_its_stimuli():
    keys, A, Y = _two_sessions()
    Y[40:, 3:] = np.random.default_rng(9).standard_normal((80, 3))  # session b: noise alone
    roi = ["a", "a", "a", "b", "b", "b"]
    s = encode(features_dataset({"a": A}, keys), NeuralData(Y, keys, roi=roi), device="cpu", inner_folds=3, folds=3,
               permutations=200)
    assert s.n_measured.values.tolist() == [80] * 6  # each session kept its 80 stimuli
    chance = json.loads(s.attrs["chance"])
    assert chance["a"]["p_value"][0] < 0.01 and chance["b"]["p_value"][0] > 0.05
    assert np.isfinite(chance["all"]["chance"][0])


def test_the_null_pairs_folds_by_rank_and_averages_the_folds_that_scored_a_target():
    """null_medians against the rule written out with whole stacks (what it computed before it summed fold by
    fold, to hold one (permutations, targets) array per fold rather than twice that): folds paired by the rank
    of their shuffles' median r, a target's r the mean of the folds that scored it."""
    from neuropredictor.encode.chance import fold_nulls, null_medians
    from neuropredictor.encode.ridge import unit_columns

    rng = np.random.default_rng(0)
    T, P = 60, 50
    groups = [np.ones(T, bool), np.arange(T) % 3 == 0]
    folds = []
    for k in range(4):
        y = rng.standard_normal((20, T))
        y[:, k] = 1.0  # constant on this fold's test stimuli: no r there
        folds.append((20, [(np.arange(T), np.arange(20), y, 0.3 * y + rng.standard_normal((20, T)))]))
    got = null_medians(fold_nulls(folds, T, P, seed=0), groups)
    draw, per_fold = np.random.default_rng(0), []
    for _, ((_, _, y, pred),) in folds:
        order = draw.permuted(np.tile(np.arange(len(y)), (P, 1)), axis=1)
        per_fold.append(np.einsum("pnt,nt->pt", unit_columns(y, np.float32)[order], unit_columns(pred, np.float32)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.array([np.nanmedian(np.nanmean([f[np.argsort(np.nanmedian(f[:, g], axis=1))][:, g]
                                                  for f in per_fold], axis=0), axis=1) for g in groups]).T
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.isfinite(got).all()


def test_a_targets_permutation_p_value_agrees_with_the_t_test_of_its_r():
    """One split: a target's permutation p-value against the classical one-sided p of Pearson r (scipy), which
    holds for normal data and is computed without shuffles."""
    from scipy.stats import pearsonr

    from neuropredictor.encode.chance import fold_nulls, target_p_values

    rng = np.random.default_rng(2)
    n, T, P = 60, 40, 4000
    y = rng.standard_normal((n, T))
    pred = np.linspace(0, 0.5, T) * y + rng.standard_normal((n, T))  # from no signal to a strong one
    folds = [(n, [(np.arange(T), np.arange(n), y, pred)])]
    got = target_p_values(folds, fold_nulls(folds, T, P, seed=0), T)
    want = np.array([pearsonr(y[:, t], pred[:, t], alternative="greater").pvalue for t in range(T)])
    assert np.abs(got - want).max() < 0.03 and np.median(np.abs(got - want)) < 0.01, np.abs(got - want).max()
    assert got.min() == 1 / (1 + P)  # the strongest targets: no shuffle as high


def test_a_targets_p_value_over_folds_is_the_best_folds_exact_p_times_the_folds():
    """Two folds of 5 have 120 shuffles each: every fold's exact p of its r, enumerated, and the smallest times 2
    (Bonferroni), against the sampled one. A pooled test of the folds ignored their dependence (review: 11 % of
    noise below 0.05 with over-fitting alphas)."""
    import itertools

    from neuropredictor.encode.chance import fold_nulls, target_p_values

    rng = np.random.default_rng(8)
    T = 3
    ys = [rng.standard_normal((5, T)) + 3.0 * f for f in range(2)]  # offsets between folds: no part of it
    preds = [0.8 * y - 2.0 * f + rng.standard_normal((5, T)) for f, y in enumerate(ys)]

    def exact(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
        yc, pc = y - y.mean(0), pred - pred.mean(0)
        r = (yc * pc).sum(0) / np.sqrt((yc ** 2).sum(0) * (pc ** 2).sum(0))
        shuffled = [(yc[list(order)] * pc).sum(0) / np.sqrt((yc ** 2).sum(0) * (pc ** 2).sum(0))
                    for order in itertools.permutations(range(5))]
        return np.mean([s >= r - 1e-9 for s in shuffled], axis=0)

    want = np.minimum(1, 2 * np.minimum(*(exact(y, p) for y, p in zip(ys, preds))))
    folds = [(5, [(np.arange(T), np.arange(5), y, p)]) for y, p in zip(ys, preds)]
    got = target_p_values(folds, fold_nulls(folds, T, 4000, seed=3), T)
    assert (want > 0.004).all() and np.abs(got - want).max() < 0.03, (got, want)


def test_target_p_values_with_folds_stay_calibrated_with_over_fitting_alphas():
    """The explorer's case: 5 folds, alphas 0.1..10 on 256 features of 200 stimuli, pure noise. The folds' models
    share training stimuli; pooled, their test put 11 % of p below 0.05."""
    rng = np.random.default_rng(11)
    n, T = 200, 200
    keys = [f"s{i:03d}" for i in range(n)]
    A = rng.standard_normal((n, 256))
    A = A + 0.1 * A @ rng.standard_normal((256, 256))  # correlated features, as a layer's are
    s = encode(features_dataset({"a": A}, keys), NeuralData(rng.standard_normal((n, T)), keys), device="cpu",
               folds=5, alphas="0.1,1,10", permutations=300)
    p = s["p"].sel(layer="a").values
    assert np.isfinite(p).all() and np.mean(p <= 0.05) <= 0.07, np.mean(p <= 0.05)
    assert np.mean(p <= 0.5) > 0.3  # not piled at 1 either


def test_scores_carry_each_targets_p_value_calibrated_on_noise_with_folds():
    rng = np.random.default_rng(4)
    n, T = 150, 120
    keys = [f"s{i:03d}" for i in range(n)]
    A = rng.standard_normal((n, 8))
    Y = rng.standard_normal((n, T))
    Y[:, :20] += A @ rng.standard_normal((8, 20))  # 20 predicted targets, 100 of noise
    Y[:30, 100:] = np.nan  # 20 noise targets measured on 120 stimuli: a set of their own
    s = encode(features_dataset({"a": A}, keys), NeuralData(Y, keys), device="cpu", folds=5, alphas="logspace:-1:4:6",
               permutations=500)
    p = s["p"].sel(layer="a").values
    assert (p[:20] == 5 / 501).all()  # no shuffle as high in any fold: the smallest p of 5 folds
    noise = p[20:]
    assert (noise > 5 / 501).all() and np.mean(noise <= 0.05) <= 0.06 and noise.min() < 0.3
    assert np.isfinite(noise[80:]).all() and np.ptp(noise[80:]) > 0.5
    without = encode(features_dataset({"a": A}, keys), NeuralData(Y, keys), device="cpu", folds=5,
                     alphas="logspace:-1:4:6", permutations=0)
    assert "p" not in without and np.array_equal(without["r"].values, s["r"].values, equal_nan=True)


def test_sets_sharing_stimuli_are_shuffled_together_so_the_null_is_not_too_narrow():
    """Targets of two sets measured on nearly the same stimuli are correlated; shuffled independently, their
    null median varied less than the observed one and pure noise was called above chance about 12 % of the
    time at p <= 0.05 (review). One shuffle, induced on each set's stimuli, keeps that near 5 %."""
    from neuropredictor.encode.chance import _induced, chance_summary, fold_nulls, null_medians

    order = np.random.default_rng(1).permuted(np.tile(np.arange(9), (2000, 1)), axis=1)
    sub = np.array([0, 2, 3, 7])
    induced = _induced(order, sub)
    assert all(sorted(row) == [0, 1, 2, 3] for row in induced[:50].tolist())  # a permutation of the set
    counts = np.unique(induced[:, 0], return_counts=True)[1]
    assert len(counts) == 4 and counts.min() > 400  # each place equally likely (500 each)
    np.testing.assert_array_equal(_induced(order, np.arange(9)), order)  # the whole fold: the shuffle itself

    rng = np.random.default_rng(0)
    T, n, P, trials = 40, 40, 99, 200
    common = rng.standard_normal((n, 1))
    hits = 0
    for _ in range(trials):
        y = 0.8 * common + 0.6 * rng.standard_normal((n, T))  # targets correlated with each other
        pred = rng.standard_normal((n, 1)) + 0.1 * rng.standard_normal((n, T))  # no information, but shared
        keep = np.arange(1, n)  # set b lacks one of the fold's stimuli
        parts = [(np.arange(T // 2), np.arange(n), y[:, :T // 2], pred[:, :T // 2]),
                 (np.arange(T // 2, T), keep, y[keep, T // 2:], pred[keep, T // 2:])]
        null = null_medians(fold_nulls([(n, parts)], T, P, seed=int(rng.integers(1 << 30))), [np.ones(T, bool)])
        from neuropredictor.encode.ridge import pearson_r
        observed = np.median(np.concatenate([pearson_r(y[:, :T // 2], pred[:, :T // 2]),
                                             pearson_r(y[keep, T // 2:], pred[keep, T // 2:])]))
        hits += chance_summary(np.array([observed]), null)["p_value"][0] <= 0.05
    assert hits / trials < 0.09, hits / trials


def _holm_by_definition(p):
    """Holm's procedure as its paper states it, written out independently: reject H_(1)..H_(k-1) where k is the first
    rank with p_(k) > alpha / (m - k + 1); the adjusted p of H_(i) is the smallest alpha rejecting it."""
    finite = [(v, i) for i, v in enumerate(p) if np.isfinite(v)]
    m, out = len(finite), [np.nan] * len(p)
    ranked = sorted(finite)
    for k, (_, i) in enumerate(ranked):
        out[i] = min(1.0, max((m - j) * ranked[j][0] for j in range(k + 1)))
    return np.array(out)


def test_holm_adjusts_p_values_as_the_procedure_defines():
    from neuropredictor.encode.chance import holm, permutations_needed

    worked = holm(np.array([0.01, 0.04, 0.03, np.nan, 0.2]))  # by hand: 0.04, 3 x 0.03 = 0.09, then 0.09 (2 x 0.04 = 0.08), 0.2
    np.testing.assert_allclose(worked, [0.04, 0.09, 0.09, np.nan, 0.2])
    rng = np.random.default_rng(3)
    for _ in range(50):
        p = rng.uniform(0, 0.2, rng.integers(1, 15))
        p[rng.random(p.size) < 0.1] = np.nan
        p[rng.random(p.size) < 0.2] = 1 / 1001  # ties, as permutation p-values have
        np.testing.assert_allclose(holm(p), _holm_by_definition(p))
    assert permutations_needed(14) == 279 and 14 / (1 + 279) <= 0.05 < 14 / (1 + 278)
    assert permutations_needed(1) == 19


def test_pure_noise_is_called_above_chance_in_some_layer_rarely_once_adjusted_for_the_layers():
    """Review: the best of 14 layers of pure noise was above chance, each layer tested on its own. Over 8 correlated
    layers of a model that knows nothing, the share of runs with any layer above chance: about 5 % adjusted, well
    above it not."""
    from neuropredictor.encode.chance import chance_summary, fold_nulls, holm, null_medians
    from neuropredictor.encode.ridge import pearson_r

    rng = np.random.default_rng(5)
    T, n, L, P, trials = 20, 40, 8, 199, 150
    any_raw = any_adjusted = 0
    for trial in range(trials):
        y = rng.standard_normal((n, T))
        shared = rng.standard_normal((n, T))
        p = []
        for _ in range(L):  # the layers' predictions share much, as neighbouring layers do
            pred = shared + 0.7 * rng.standard_normal((n, T))
            null = null_medians(fold_nulls([(n, [(np.arange(T), np.arange(n), y, pred)])], T, P, seed=trial),
                                [np.ones(T, bool)])
            p.append(chance_summary(np.array([np.median(pearson_r(y, pred))]), null)["p_value"][0])
        any_raw += min(p) <= 0.05
        any_adjusted += np.nanmin(holm(np.array(p))) <= 0.05
    assert any_raw / trials > 0.12 and any_adjusted / trials < 0.08, (any_raw / trials, any_adjusted / trials)


def test_too_few_permutations_for_the_layers_are_warned_of(caplog):
    keys, A, Y = _small(60)
    feats = features_dataset({"a": A, "b": A[:, ::-1].copy(), "c": A ** 2}, keys)
    with caplog.at_level(logging.WARNING, logger="neuropredictor.encode"):
        s = encode(feats, NeuralData(Y, keys), device="cpu", inner_folds=3, permutations=39)
    said = [r.getMessage() for r in caplog.records if "permutations cannot" in r.getMessage()]
    assert said == ["39 permutations cannot put any of 3 layers above chance once p-values are adjusted for the "
                    "number of layers (the smallest p is 1/40); use permutations >= 59"]
    assert not summary_table(s)["above_chance"].any()  # as warned: 3 x 1/40 > 0.05, whatever the data
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neuropredictor.encode"):
        encode(feats, NeuralData(Y, keys), device="cpu", inner_folds=3, permutations=59, layers="a,b")
    assert not [r for r in caplog.records if "permutations cannot" in r.getMessage()]


def test_few_held_out_stimuli_are_warned_of():
    keys, A, Y = _small(60)
    train = np.ones(60, bool)
    train[:3] = False  # a split file naming 3 test stimuli ran without a word
    with pytest.warns(AlignmentWarning, match=r"3 held-out stimuli: a target's r on so few is noisy"):
        encode(features_dataset({"a": A}, keys), NeuralData(Y, keys, train=train), device="cpu", inner_folds=3,
               permutations=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AlignmentWarning)  # every stimulus held out once: no warning
        encode(features_dataset({"a": A}, keys), NeuralData(Y, keys), device="cpu", inner_folds=3, folds=3,
               permutations=0)


def test_many_sets_of_measured_stimuli_are_refused_and_small_sets_left_unscored():
    keys, A, Y = _small(120)
    stray = np.tile(Y[:, :1], (1, 70))
    stray[np.arange(70), np.arange(70)] = np.nan  # every target misses another stimulus: 70 sets
    with pytest.raises(EncodingError, match=r"measured on 70 different sets of stimuli.*fill them"):
        encode(features_dataset({"a": A}, keys), NeuralData(stray, keys), device="cpu", inner_folds=3)

    Y = Y.copy()
    Y[8:, 4] = np.nan  # measured on 8 stimuli: too few to fit
    with pytest.warns(AlignmentWarning, match=r"1 targets cannot be scored.*measured on too few stimuli.*'t4'"):
        s = encode(features_dataset({"a": A}, keys), NeuralData(Y, keys), device="cpu", inner_folds=3)
    assert np.isnan(s.r.values[0, 4]) and np.isfinite(s.r.values[0, :4]).all()
    assert s.attrs["dropped_few_stimuli_targets"] == 1 and s.n_measured.values[4] == 8
    part = Y.copy()
    part[14:, 3] = np.nan  # 14 stimuli: some of 4 folds hold too few of them to score
    with pytest.warns(AlignmentWarning, match=r"1 targets are scored in only some of the 4 folds.*'t3'"):
        s = encode(features_dataset({"a": A}, keys), NeuralData(part, keys), device="cpu", inner_folds=3, folds=4)
    assert np.isfinite(s.r.values[0, 3])
    few = np.full((120, 2), np.nan)
    few[:8, 0], few[8:16, 1] = Y[:8, 0], Y[8:16, 1]  # 16 stimuli in all, but 8 per target
    with pytest.warns(AlignmentWarning), pytest.raises(EncodingError, match="no target was measured on enough"):
        encode(features_dataset({"a": A}, keys), NeuralData(few, keys), device="cpu", inner_folds=3)


def test_rsa_keeps_only_stimuli_measured_for_every_target(planted):
    neural = planted["neural"]
    Y = neural.values.copy()
    Y[:5, 0] = np.nan
    with pytest.warns(AlignmentWarning, match=r"5 nan neural"):
        out = rsa(planted["ds"], NeuralData(Y, neural.keys), layers="mid")
    assert out.attrs["n_stimuli"] == len(neural.keys) - 5
    assert "an RDM needs them all" in json.loads(out.attrs["alignment"])["dropped"]["nan_neural"]["why"]


def test_alphas_at_an_end_of_the_grid_are_warned_about(caplog):
    # a weak signal in much noise wants a large alpha: a grid that stops at 0.1 under-regularises the targets
    keys, A, _ = _small(80)
    rng = np.random.default_rng(5)
    weak = 0.3 * A @ rng.standard_normal((A.shape[1], 5)) + rng.standard_normal((80, 5))
    with caplog.at_level(logging.WARNING, logger="neuropredictor.encode"):
        s = encode(features_dataset({"a": A}, keys), NeuralData(weak, keys), device="cpu", inner_folds=3,
                   alphas="0.01,0.1")
    assert (s.alpha.values == 0.1).mean() > 0.5 and (s.r.values > 0.3).all()
    assert re.search(r"layer a: \d+% of the alphas chosen .* grid's largest, 0.1, for targets it predicts; .* "
                     r"extend the grid upward", caplog.text)
    caplog.clear()
    # noise alone rightly takes the largest alpha there is: not a grid too short (it warned on every layer
    # of data with unpredictable voxels)
    noise = rng.standard_normal((80, 200))
    with caplog.at_level(logging.WARNING, logger="neuropredictor.encode"):
        s = encode(features_dataset({"a": A}, keys), NeuralData(noise, keys), device="cpu", inner_folds=3,
                   folds=4, permutations=0)
    assert (s.alpha.values == s.alpha.values.max()).mean() > 0.2 and "grid's" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neuropredictor.encode"):  # a signal: alphas inside the grid
        encode(features_dataset({"a": A}, keys), NeuralData(A @ np.ones((10, 3)), keys), device="cpu",
               inner_folds=3, alphas="logspace:-6:6:13")
    assert "grid's" not in caplog.text


# ---------------------------------------------------------------------------------------------
# RSA


def test_rsa_recovers_the_source_layer(planted):
    ds = planted["ds"]
    keys = list(ds.key.values)
    # neural patterns = the mid layer's patterns (plus a little noise), in another row order
    rng = np.random.default_rng(0)
    Y = planted["mid"] + 0.05 * rng.standard_normal(planted["mid"].shape)
    order = rng.permutation(N)
    nd = NeuralData(Y[order], [keys[i] for i in order], roi=["a"] * 25 + ["b"] * 25)
    res = rsa(ds, nd)
    assert res.rho.sel(layer="mid") > 0.95
    assert res.rho.sel(layer="early") < res.rho.sel(layer="mid") - 0.2
    assert abs(res.rho.sel(layer="late")) < 0.1
    assert res.rho_roi.dims == ("layer", "roi") and list(res.roi.values) == ["a", "b"]
    assert res.rho_roi.sel(layer="mid").min() > res.rho_roi.sel(layer="late").max()
    # an RDM given directly
    direct = rsa(ds, neural_rdm=rdm(planted["mid"]), rdm_keys=keys, layers=["mid", "late"])
    assert direct.rho.sel(layer="mid") == pytest.approx(1.0, abs=1e-6)
    assert abs(direct.rho.sel(layer="late")) < 0.1


def test_rsa_p_value_agrees_with_the_exact_permutation_distribution():
    """7 stimuli have 5,040 orders: the exact Mantel p, by scipy's Spearman over every reordering of the neural
    patterns, against the sampled one."""
    import itertools

    from scipy.stats import spearmanr

    rng = np.random.default_rng(7)
    n = 7
    keys = [f"s{i}" for i in range(n)]
    X = rng.standard_normal((n, 30))
    Y = X[:, :10] + 1.5 * rng.standard_normal((n, 10))
    iu = np.triu_indices(n, k=1)
    with np.errstate(invalid="ignore"):
        layer = 1 - np.corrcoef(X)
    rho = lambda Yp: spearmanr(layer[iu], (1 - np.corrcoef(Yp))[iu]).statistic  # noqa: E731
    observed = rho(Y)
    exact = np.mean([rho(Y[list(order)]) >= observed - 1e-9 for order in itertools.permutations(range(n))])
    got = rsa(features_dataset({"x": X}, keys), NeuralData(Y, keys), permutations=4000, seed=1)
    assert float(got.rho.sel(layer="x")) == pytest.approx(observed, abs=1e-9)
    assert 0.02 < exact < 0.5  # a p-value the sampling can miss
    assert float(got.p.sel(layer="x")) == pytest.approx(exact, abs=0.025), exact


def test_rsa_p_values_are_uniform_for_unrelated_data():
    rng = np.random.default_rng(11)
    n, trials = 12, 150
    keys = [f"s{i}" for i in range(n)]
    p = np.array([float(rsa(features_dataset({"x": rng.standard_normal((n, 20))}, keys),
                            NeuralData(rng.standard_normal((n, 8)), keys), permutations=99, seed=t).p.item())
                  for t in range(trials)])
    low, half = np.mean(p <= 0.05), np.mean(p <= 0.5)
    assert 0.01 <= low <= 0.1 and 0.35 <= half <= 0.65, (low, half)


def test_rsa_table_marks_layers_above_chance_after_holm_and_the_best(planted):
    ds, keys = planted["ds"], list(planted["ds"].key.values)
    rng = np.random.default_rng(0)
    nd = NeuralData(planted["mid"] + 0.05 * rng.standard_normal(planted["mid"].shape), keys,
                    roi=["a"] * 25 + ["b"] * 25)
    res = rsa(ds, nd, permutations=200)
    table = rsa_table(res).set_index(["roi", "layer"])
    assert res.p.sel(layer="mid") == pytest.approx(1 / 201) and res.p.sel(layer="late") > 0.05
    assert res.p_roi.dims == ("layer", "roi")
    for roi in ("all", "a", "b"):
        assert table.loc[(roi, "mid"), "best"] and table.loc[(roi, "mid"), "above_chance"]
        assert not table.loc[(roi, "late"), "above_chance"]
    np.testing.assert_allclose(table.loc["all", "p_holm"], np.minimum(1, np.maximum.accumulate(
        np.sort(res.p.values) * [3, 2, 1]))[np.argsort(np.argsort(res.p.values))])
    untested = rsa_table(rsa(ds, nd, permutations=0))
    assert untested.above_chance.isna().all() and untested.set_index(["roi", "layer"]).loc[("all", "mid"), "best"]
    # untested, a layer whose RDM correlates negatively is the best of nothing (explorer: "best" at rho -0.07)
    for seed in range(50):  # unrelated data whose rho comes out negative
        unrelated = rsa(ds, NeuralData(np.random.default_rng(seed).standard_normal((len(keys), 8)), keys),
                        layers=["mid"], permutations=0)
        if unrelated.rho.item() < 0:
            break
    assert unrelated.rho.item() < 0 and not rsa_table(unrelated).best.any()
    # a stimulus with a constant pattern: its pairs are left out, and the test permutes the others
    flat = ds.copy(deep=True)
    flat["mid"][3] = 0.0
    one = rsa(flat, nd, layers=["mid"], permutations=200)
    assert np.isfinite(one.rho.item()) and one.p.item() == pytest.approx(1 / 201)


def test_rsa_command_prints_layers_above_chance_and_saves_them(pipeline_store, tmp_path):
    from typer.testing import CliRunner

    from neuropredictor.cli import app

    out = str(tmp_path / "rsa.zarr")
    args = ["rsa", pipeline_store["features"], pipeline_store["neural"], "--keys", pipeline_store["keys_file"],
            "--permutations", "200", "--out", out]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    rows = {r["layer"]: r for r in summary["layers"]}
    assert summary["n_stimuli"] == 58 and set(rows) == {"layer1", "layer4"}
    # the planted map is linear in layer4; random conv layers share the images' structure, so both RDMs follow it
    assert all(r["above_chance"] and r["p"] == pytest.approx(1 / 201) for r in rows.values())
    top = max(r["rho"] for r in rows.values())
    assert [r["best"] for r in rows.values()] == [r["rho"] == top for r in rows.values()]
    saved = xr.open_zarr(out)
    assert float(saved.rho.sel(layer="layer4")) == pytest.approx(rows["layer4"]["rho"])
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    shown = CliRunner().invoke(app, [*args, "--overwrite", "--layers", "layer4"])
    assert shown.exit_code == 0, shown.output
    assert re.search(r"layer4\s*│\s*[0-9.]+ \*", shown.output) and "best layer, all: layer4" in shown.output
    bad = CliRunner().invoke(app, ["rsa", pipeline_store["features"], pipeline_store["neural"]])
    assert bad.exit_code == 2 and "keys" in bad.output


def test_rdm_is_one_minus_pearson_and_needs_little_memory_beyond_the_layer():
    # rdm copied a layer to float64, then centred and scaled copies: 6 times a float32 layer at its peak
    import tracemalloc

    rng = np.random.default_rng(0)
    X = (3 * rng.standard_normal((60, 5000)) + 10 * rng.standard_normal((60, 1))).astype(np.float32)
    X[5] = 2.0  # a constant pattern: NaN against every other, 0 on the diagonal
    with np.errstate(invalid="ignore", divide="ignore"):
        d, ref = rdm(X), 1 - np.corrcoef(X.astype(np.float64))
    others = np.arange(60) != 5
    np.testing.assert_allclose(d[np.ix_(others, others)], ref[np.ix_(others, others)], atol=1e-12)
    assert np.isnan(d[5, others]).all() and np.isnan(d[others, 5]).all() and d[5, 5] == 0
    wide = rng.standard_normal((200, 50_000)).astype(np.float32)
    tracemalloc.start()
    try:
        rdm(wide)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * wide.nbytes, peak / wide.nbytes


def test_rsa_leaves_out_the_pairs_of_a_constant_pattern(planted):
    # One stimulus whose features are constant (a blank image, an all-zero ReLU row) has no correlation
    # distance to the others: its pairs are left out, not the whole layer turned NaN.
    from scipy.stats import spearmanr

    ds = planted["ds"].copy(deep=True)
    ds["mid"][3] = 0.0
    keys = list(ds.key.values)
    nd = NeuralData(planted["mid"] + 0.05 * np.random.default_rng(0).standard_normal(planted["mid"].shape), keys)
    got = float(rsa(ds, nd, layers=["mid"]).rho.sel(layer="mid"))
    iu = np.triu_indices(N, k=1)
    model_rdm, neural_rdm = rdm(ds["mid"].values)[iu], rdm(nd.values)[iu]
    kept = (iu[0] != 3) & (iu[1] != 3)
    assert np.isnan(model_rdm[~kept]).all() and np.isfinite(model_rdm[kept]).all()
    assert got == pytest.approx(spearmanr(model_rdm[kept], neural_rdm[kept]).statistic, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Outputs


def test_save_scores_round_trip_and_plot(planted, tmp_path):
    s = planted["scores"]
    url = str(tmp_path / "scores.zarr")
    save_scores(s, url)
    back = xr.open_zarr(url)
    xr.testing.assert_allclose(back.load(), s)
    assert back.attrs["n_train"] == 480 and json.loads(back.attrs["alignment"])["n_matched"] == N
    with pytest.raises(EncodingError, match="already exists"):
        save_scores(s, url)
    # encode checked its output only after the whole fit (hours on real data): now before reading anything
    np.savez(tmp_path / "unmatched.npz", data=np.zeros((3, 2)), keys=np.array(["x", "y", "z"]))
    with pytest.raises(EncodingError, match="already exists"):  # not "no stimulus key is in both"
        encode_command(features=str(tmp_path / "absent.zarr"), neural=str(tmp_path / "unmatched.npz"), out=url)
    save_scores(s, url, overwrite=True)
    # overwrite replaces scores only: writing deletes the folder whole, and a folder of other things survived
    # only as long as nobody asked to overwrite it
    other = tmp_path / "notes"
    (other / "sub").mkdir(parents=True)
    (other / "sub" / "data.csv").write_text("precious")
    with pytest.raises(EncodingError, match="something other than scores"):
        save_scores(s, str(other), overwrite=True)
    assert (other / "sub" / "data.csv").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    save_scores(s, str(tmp_path / "empty"))  # an empty folder is fine
    png = plot_scores(s, tmp_path / "scores.png")
    data = Path(png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_the_scores_plot_draws_each_groups_noise_ceiling(planted):
    from neuropredictor.encode.report import _scores_figure

    s = planted["scores"]
    ceiling = np.where(np.asarray(s.roi.values) == "V1", 0.6, 0.9)
    ceiling[0] = np.nan  # a target without one
    fig = _scores_figure(s.assign(ceiling=("target", ceiling)), "r")
    drawn = {ax.get_title().split(" (")[0]: [ln.get_ydata()[0] for ln in ax.get_lines()
                                             if ln.get_label().startswith("noise ceiling")] for ax in fig.axes}
    assert drawn == {"all": [pytest.approx(np.nanmedian(ceiling))], "V1": [0.6], "IT": [0.9]}
    assert not any(ln.get_label().startswith("noise ceiling") for ax in _scores_figure(s, "r").axes
                   for ln in ax.get_lines())


def test_helpers_work_on_reopened_scores(planted, tmp_path):
    """summary_table and plot_scores on `xr.open_zarr` of saved scores, whose strings come back as
    numpy's StringDType (issue 12, item 7: both raised a TypeError)."""
    s = planted["scores"]
    url = str(tmp_path / "scores.zarr")
    save_scores(s, url)
    back = xr.open_zarr(url)
    pd.testing.assert_frame_equal(summary_table(back), summary_table(s))
    png = plot_scores(back, tmp_path / "reopened.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_with_roi_file_and_missing_store(planted, tmp_path):
    ds, nd = planted["ds"], planted["neural"]
    df = pd.DataFrame(nd.values, columns=nd.targets)
    df.insert(0, "key", nd.keys)
    df.to_csv(tmp_path / "neural.csv", index=False)
    (tmp_path / "roi.txt").write_text("\n".join(nd.roi))
    out = str(tmp_path / "out.zarr")
    with pytest.raises(NeuroPredictorError, match="no neuropredictor store"):
        encode_command(features=str(tmp_path / "missing.zarr"), neural=str(tmp_path / "neural.csv"), out=out)
    neural = load_neural(tmp_path / "neural.csv", roi=str(tmp_path / "roi.txt"))
    assert neural.roi == nd.roi
    s = encode(ds, neural, layers="mid,late", device="cpu")
    assert s.r.median("target").idxmax().item() == "mid"


# ---------------------------------------------------------------------------------------------
# A real store from the pipeline


@pytest.fixture(scope="module")
def pipeline_store(tmp_path_factory):
    """A features store made by the pipeline (resnet18, layer1 and layer4 averaged), and neural data planted
    on layer4, written as y.npy + keys.txt in another order, two stimuli missing, one unknown stimulus."""
    from neuropredictor.corpus import make_shards
    from neuropredictor import ExtractConfig, run
    from neuropredictor.store import open_features

    root = tmp_path_factory.mktemp("pipeline")
    images = root / "imgs"
    make_images(images, 60, nested=False)
    make_shards(images, str(root / "shards"), maxcount=25)
    out = str(root / "run.zarr")
    run(ExtractConfig(corpus=str(root / "shards"), model="torchvision:resnet18", layers=["layer1", "layer4"],
                      reduce="avgpool", out=out, pretrained=False, batch_size=20, num_workers=0))
    feats = open_features(out)
    keys = [str(k) for k in feats.key.values]
    l4 = feats["layer4"].values
    rng = np.random.default_rng(0)
    l4z = (l4 - l4.mean(0)) / (l4.std(0) + 1e-6)
    # a known linear map of layer4: its 5 leading principal directions, mixed at random (a map
    # that 46 training images can pin down; all 512 weights free would need far more)
    pcs = np.linalg.svd(l4z, full_matrices=False)[2][:5]
    signal = l4z @ pcs.T @ rng.standard_normal((5, 30))
    Y = signal + 0.5 * signal.std(0) * rng.standard_normal(signal.shape)
    order = rng.permutation(len(keys))[:-2]
    nd = NeuralData(np.vstack([Y[order], np.zeros((1, 30))]), [keys[i] for i in order] + ["not-a-stimulus"])
    np.save(root / "y.npy", nd.values)
    (root / "keys.txt").write_text("\n".join(nd.keys))
    return {"features": out, "neural": str(root / "y.npy"), "keys_file": str(root / "keys.txt")}


def test_real_store_from_pipeline(pipeline_store, tmp_path):
    with pytest.warns(AlignmentWarning, match="2 features only.*1 neural only.*'not-a-stimulus'"):
        result = encode_command(**pipeline_store, out=str(tmp_path / "scores.zarr"), alphas="logspace:-2:6:9",
                                device="cpu")
    assert result["best_layer"] == "layer4", result
    assert result["layers"]["layer4"] > 0.6 and result["layers"]["layer4"] > result["layers"]["layer1"]
    assert result["dropped"]["features_only"] == 2 and result["dropped"]["neural_only"] == 1
    assert result["n_train"] + result["n_test"] == 58
    scores = xr.open_zarr(result["scores"])
    assert list(scores.layer.values) == ["layer1", "layer4"]  # model order
    assert Path(result["plot"]).stat().st_size > 0


class _Scored:
    """score_layer as it is, counting the layers it scores; raising for the layers in `fail` (an exception,
    or KeyboardInterrupt standing for a process killed there)."""

    def __init__(self, monkeypatch, fail: dict[str, BaseException] | None = None):
        import neuropredictor.encode.run as run_module

        current = run_module.score_layer
        self.real, self.fail, self.layers = getattr(current, "real", current), dict(fail or {}), []
        monkeypatch.setattr(run_module, "score_layer", self)

    def __call__(self, prep, layer, options=None, **fields):
        if layer in self.fail:
            raise self.fail[layer]
        self.layers.append(layer)
        return self.real(prep, layer, options, **fields)


def _scores_arrays(url: str) -> dict[str, np.ndarray]:
    ds = xr.open_zarr(url)
    return {k: ds[k].values for k in ("r", "r2", "alpha")}


def test_a_killed_encode_resumes_at_the_layer_it_had_not_finished(pipeline_store, tmp_path, monkeypatch):
    common = {**pipeline_store, "alphas": "logspace:-2:6:9", "device": "cpu", "permutations": 20}
    warnings.simplefilter("ignore", AlignmentWarning)
    reference = encode_command(**common, out=str(tmp_path / "reference.zarr"))
    assert not Path(str(tmp_path / "reference.zarr") + ".partial").exists()  # removed once saved

    out = str(tmp_path / "scores.zarr")
    killed = _Scored(monkeypatch, {"layer4": KeyboardInterrupt()})  # the process dies in the second layer
    with pytest.raises(KeyboardInterrupt):
        encode_command(**common, out=out)
    assert killed.layers == ["layer1"] and not Path(out).exists()
    assert len(list(Path(out + ".partial").rglob("*.npz"))) == 1

    other = _Scored(monkeypatch, {"layer4": KeyboardInterrupt()})  # other inputs: nothing kept is theirs
    with pytest.raises(KeyboardInterrupt):
        encode_command(**{**common, "seed": 1}, out=out)
    assert other.layers == ["layer1"]

    rerun = _Scored(monkeypatch)
    summary = encode_command(**common, out=out)
    assert rerun.layers == ["layer4"]  # layer1 came from the killed run
    for name, ref in _scores_arrays(reference["scores"]).items():
        np.testing.assert_array_equal(_scores_arrays(out)[name], ref)
    assert summary["layers"] == reference["layers"] and summary["chance"] == reference["chance"]
    assert not Path(out + ".partial").exists()  # both fingerprints' layers removed with the scores saved

    # a store replaced with the same config (its images changed, `extract --overwrite`) is another input
    from neuropredictor.encode import EncodeOptions, prepare
    from neuropredictor.encode.run import fingerprint

    opts = EncodeOptions(**common, out=out)
    prep = prepare(opts.features, opts.read_neural(), opts)
    before = fingerprint(prep, opts)
    assert before == fingerprint(prepare(opts.features, opts.read_neural(), opts), opts)
    prep.ds.attrs["content"] = "another store's rows"
    assert fingerprint(prep, opts) != before
    # what the content is: the generation and the commit of each shard
    from neuropredictor.store import FeatureStore

    store = FeatureStore.open(pipeline_store["features"], mode="r")
    commits = store.committed()
    name = sorted(commits)[0]
    assert store.content_id() == store.content_id(commits)
    assert store.content_id({**commits, name: {**commits[name], "committed_at": "later"}}) != store.content_id()
    store.generation = "a replacement"
    assert store.content_id(commits) != FeatureStore.open(pipeline_store["features"], mode="r").content_id()


def test_a_plot_that_cannot_be_written_leaves_no_scores_to_refuse(pipeline_store, tmp_path):
    common = {**pipeline_store, "alphas": "logspace:-2:6:9", "device": "cpu", "permutations": 0, "layers": "layer1"}
    warnings.simplefilter("ignore", AlignmentWarning)
    out = str(tmp_path / "scores.zarr")
    (tmp_path / "taken.png").mkdir()  # a folder where the plot would go
    with pytest.raises(IsADirectoryError):
        encode_command(**common, out=out, plot=str(tmp_path / "taken.png"))
    # was: the scores written first, then the error; the rerun refused ("already exists")
    assert not Path(out).exists() and len(list(Path(out + ".partial").rglob("*.npz"))) == 1
    summary = encode_command(**common, out=out, plot=str(tmp_path / "new" / "deeper" / "p.png"))
    assert Path(summary["plot"]).stat().st_size > 0 and Path(out).exists()  # its folder made, as --out's is


def test_outputs_that_cannot_be_created_are_refused_before_any_fit(pipeline_store, tmp_path, s3, monkeypatch):
    # encode fitted every layer, then failed on a missing bucket (FileNotFoundError, without the path)
    from neuropredictor.encode import run as encode_run
    from neuropredictor.errors import StoreError
    from neuropredictor.pipeline.planning import check_output

    fitted: list[str] = []
    monkeypatch.setattr(encode_run, "score_layer", lambda prep, layer, *a, **k: fitted.append(layer))
    (tmp_path / "a-file").write_text("x")
    common = {**pipeline_store, "device": "cpu", "permutations": 0}
    # at the endpoint named: a wrong port (MinIO's console) also answers "no such bucket"
    for out, words in (("s3://no-such-bucket/scores.zarr", f"its bucket 'no-such-bucket' does not exist at "
                        f"{re.escape(s3['endpoint_url'])}: create it, or check that this endpoint is the S3 API's"),
                       (str(tmp_path / "a-file" / "scores.zarr"), "a-file' is a file, not a folder")):
        with pytest.raises(EncodingError, match=f"cannot create the scores store .*{words}"):
            encode_command(**common, out=out, storage_options=s3)
        with pytest.raises(StoreError, match=f"cannot create the output store .*{words}"):  # extract: one rule
            check_output(out.replace("scores", "features"), s3)
    assert fitted == []
    check_output("s3://test-bucket/new/deeper/f.zarr", s3)  # a bucket that exists: folders are made as written


def test_a_layer_that_cannot_be_kept_is_still_scored(pipeline_store, tmp_path, caplog):
    out = tmp_path / "scores.zarr"
    Path(str(out) + ".partial").write_text("a file where the kept layers would go")
    warnings.simplefilter("ignore", AlignmentWarning)
    with caplog.at_level(logging.WARNING, logger="neuropredictor.encode.run"):
        summary = encode_command(**pipeline_store, out=str(out), alphas="logspace:-2:6:9", device="cpu",
                                 permutations=0)
    assert summary["best_layer"] == "layer4" and "could not be kept" in caplog.text


def test_a_failed_layer_does_not_stop_the_others_and_nothing_half_is_written(pipeline_store, tmp_path,
                                                                            monkeypatch):
    common = {**pipeline_store, "alphas": "logspace:-2:6:9", "device": "cpu", "permutations": 0,
              "out": str(tmp_path / "scores.zarr")}
    warnings.simplefilter("ignore", AlignmentWarning)
    failing = _Scored(monkeypatch, {"layer1": MemoryError("cannot allocate 32 GiB")})
    with pytest.raises(EncodingError, match=r"1 of 2 layers could not be scored \(layer1: MemoryError: cannot "
                       r"allocate 32 GiB\); no scores were written, the 1 layers scored are kept in .*scores.zarr"
                       r"\.partial: run the same command again"):
        encode_command(**common)
    assert failing.layers == ["layer4"] and not Path(common["out"]).exists()
    rerun = _Scored(monkeypatch)
    assert encode_command(**common)["best_layer"] == "layer4"
    assert rerun.layers == ["layer1"]


def test_kept_layers_of_a_damaged_file_or_a_foreign_folder(pipeline_store, tmp_path, monkeypatch, caplog):
    common = {**pipeline_store, "alphas": "logspace:-2:6:9", "device": "cpu", "permutations": 0,
              "out": str(tmp_path / "scores.zarr")}
    warnings.simplefilter("ignore", AlignmentWarning)
    _Scored(monkeypatch, {"layer4": KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        encode_command(**common)
    [kept] = Path(common["out"] + ".partial").rglob("*.npz")
    kept.write_bytes(kept.read_bytes()[:100])  # torn
    (kept.parent.parent / "notes.txt").write_text("mine")  # the user's file in a folder of that name
    rerun = _Scored(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="neuropredictor.encode.kept"):
        encode_command(**common)
    assert rerun.layers == ["layer1", "layer4"]
    assert "its kept scores cannot be read" in caplog.text and "left as it is" in caplog.text
    assert (kept.parent.parent / "notes.txt").read_text() == "mine"


def test_cli_groups_option_reaches_the_split(pipeline_store, tmp_path):
    from typer.testing import CliRunner

    from neuropredictor.cli import app

    keys = (Path(pipeline_store["keys_file"]).read_text().splitlines())
    (tmp_path / "groups.txt").write_text("\n".join(f"g{i % 12}" for i in range(len(keys))))
    args = ["encode", pipeline_store["features"], pipeline_store["neural"], "--keys", pipeline_store["keys_file"],
            "--out", str(tmp_path / "s.zarr"), "--folds", "4", "--permutations", "0", "--device", "cpu", "--json"]
    result = CliRunner().invoke(app, [*args, "--groups", str(tmp_path / "groups.txt")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["split"] == "4-fold CV, 58 stimuli, by group (12 groups)"
    assert xr.open_zarr(summary["scores"]).attrs["n_groups"] == 12


def test_scoring_a_wide_layer_holds_little_more_than_the_layer(monkeypatch):
    """The peak of memory while one wide layer is scored (tracemalloc): the layer read from the store, plus a
    block of its features at a time while the kernels are built (no standardised copy of its rows, which
    made the peak 2.6 times the layer)."""
    import tracemalloc

    from neuropredictor.encode import prepare, score_layer
    from neuropredictor.encode import ridge

    rng = np.random.default_rng(0)
    n, p = 300, 30000
    X = rng.standard_normal((n, p), dtype=np.float32)
    keys = [f"k{i}" for i in range(n)]
    Y = X[:, :20] @ rng.standard_normal((20, 8)) + rng.standard_normal((n, 8))
    prep = prepare(features_dataset({"x": X}, keys), NeuralData(Y, keys), device="cpu")
    whole = score_layer(prep, "x", device="cpu", permutations=0)  # (also: imports are not the fit's memory)
    tracemalloc.start()
    try:
        part = score_layer(prep, "x", device="cpu", permutations=0, batch_bytes=2**22)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert part.solver == "kernel" and np.isfinite(part.r).all()
    assert peak < 1.6 * X.nbytes, peak / X.nbytes  # 1.25 of it reading the layer (its NaN check)
    # the batch size is no part of the numbers (a rerun with a smaller one after running out of memory reuses
    # the layers kept by the first)
    np.testing.assert_array_equal(part.r, whole.r)
    # the sum over blocks of features is the kernel of the whole layer at once (himalaya's own linear kernel
    # gives that bit for bit); in float64, as float32 sums in another order move these near-chance r by 1e-3
    blocks = score_layer(prep, "x", device="cpu", permutations=0, dtype="float64")
    monkeypatch.setattr(ridge, "_KERNEL_BLOCK", 10**9)
    at_once = score_layer(prep, "x", device="cpu", permutations=0, dtype="float64")
    np.testing.assert_allclose(blocks.r, at_once.r, atol=1e-9)
    np.testing.assert_array_equal(blocks.alpha, at_once.alpha)
    (tr, te), = prep.splits
    kept = {k: v.copy() for k, v in (("tr", X[tr]), ("te", X[te]))}
    encode_layer(kept["tr"], Y[tr], kept["te"], Y[te], parse_alphas("logspace:-1:5:7"), device="cpu")
    np.testing.assert_array_equal(kept["tr"], X[tr])  # the caller's arrays untouched
    np.testing.assert_array_equal(kept["te"], X[te])
    with pytest.raises(EncodingError, match="train and test share rows"):
        ridge.encode_rows(X, np.arange(10, 300), np.arange(0, 20), Y[10:], Y[:20])
    with pytest.raises(EncodingError, match="row indices"):
        ridge.encode_rows(X, np.arange(300) >= 60, np.arange(60), Y[60:], Y[:60])


def test_encode_reads_a_file_with_its_reading_options_and_takes_paths(tmp_path):
    # encode(url, "n.npz", roi="roi") was refused ("extra inputs"), though the README gives EncodeOptions'
    # names as encode()'s keywords; pathlib paths were refused by open_features and ExtractConfig
    from neuropredictor import ExtractConfig
    from neuropredictor.store import open_features

    keys, A, Y = _small(80)
    ds = features_dataset({"a": A}, keys)
    held = np.arange(80) % 5 == 0
    np.savez(tmp_path / "n.npz", data=Y, key=np.array(keys), region=np.array(["V1", "V1", "IT", "IT", "IT"]),
             is_test=held)
    scores = encode(ds, tmp_path / "n.npz", roi="region", split="is_test", device="cpu", permutations=0)
    assert list(scores.roi.values) == ["V1", "V1", "IT", "IT", "IT"] and scores.attrs["n_test"] == 16
    options = EncodeOptions(features="f", neural="n", out="o", roi="region", split="is_test", device="cpu",
                            permutations=0)  # the reading options of an options object count too
    assert encode(ds, tmp_path / "n.npz", options).attrs["n_test"] == 16
    with pytest.raises(EncodingError, match="roi describe how a neural data file is read.*already loaded"):
        encode(ds, NeuralData(Y, keys), roi="region", device="cpu")
    with pytest.raises(EncodingError, match="features must be a features store.*not a ndarray.*encode_layer"):
        encode(A, NeuralData(Y, keys), device="cpu")
    with pytest.raises(EncodingError, match="14 training and 2 test stimuli.*use fewer folds"):
        encode(features_dataset({"a": A[:16]}, keys[:16]), NeuralData(Y[:16], keys[:16]), folds=8, device="cpu")
    config = ExtractConfig(corpus=tmp_path / "shards", model="timm:resnet18", layers=["layer4"], out=tmp_path / "o")
    assert config.corpus == str(tmp_path / "shards") and config.out == str(tmp_path / "o")
    with pytest.raises(NeuroPredictorError, match="o"):  # a Path reaches the store's own error, not a TypeError
        open_features(tmp_path / "o")
