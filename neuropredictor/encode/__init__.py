"""Encoding models: how well each layer of a run predicts each voxel / neuron, and RSA.

    neural = load_neural("betas.npz", split="is_test")      # (stimuli x targets), keys inside
    scores = encode("runs/r1.zarr", neural, folds=5)         # xarray: r, r2, alpha (layer x target)
    summary_table(scores)                                    # median r per layer, best layer per ROI
    save_scores(scores, "runs/r1-scores.zarr"); plot_scores(scores, "runs/r1-scores.png")

Per layer: features flattened to (stimuli, features), standardised with the training stimuli's
mean/std only, then ridge regression for all targets at once with himalaya, alpha chosen per
target by an inner cross-validation on the training stimuli, and scored on held-out stimuli
(Pearson r and R^2). Stimuli are matched by key; whatever cannot be matched or used is reported
(counts and examples, in the result's attrs and as an `AlignmentWarning`) and dropped, never
silently misaligned.

Each layer is also tested against chance (a permutation null of its median r, see `chance`): a best
layer is named only where it beats chance.

Modules: `neural` (reading neural data), `align` (features store, matching by key, splits),
`target_sets` (targets measured on different stimuli, each fitted on theirs), `ridge` (the solver for one
layer on arrays), `chance`, `run` (prepare -> score_layer -> assemble), `report`
(table, saving, plot), `kept` (finished layers kept until the scores are saved), `rsa`, and `options`
(`FitOptions` / `EncodeOptions`: every option, shared by the CLI, this API and the `encode` flow).
"""

from neuropredictor.encode._common import AlignmentWarning, EncodingError
from neuropredictor.encode.neural import NeuralData, load_neural
from neuropredictor.encode.options import EncodeOptions, FitOptions, parse_alphas
from neuropredictor.encode.report import check_scores_out, plot_scores, save_outputs, save_scores, summary_table
from neuropredictor.encode.ridge import DEFAULT_ALPHAS, encode_layer, pearson_r, r2_score
from neuropredictor.encode.rsa import rdm, rsa, rsa_table
from neuropredictor.encode.kept import KeptLayers
from neuropredictor.encode.run import (LayerScores, Prepared, assemble, encode, encode_command, kept_layers, prepare,
                                       score_kept, score_layer, score_layers)

__all__ = [
    "DEFAULT_ALPHAS", "AlignmentWarning", "EncodeOptions", "EncodingError", "FitOptions", "KeptLayers", "LayerScores",
    "NeuralData", "Prepared", "assemble", "check_scores_out", "encode", "encode_command", "encode_layer", "kept_layers",
    "load_neural", "parse_alphas", "pearson_r", "plot_scores", "prepare", "r2_score", "rdm", "rsa", "rsa_table",
    "save_outputs", "save_scores", "score_kept", "score_layer", "score_layers", "summary_table",
]
