"""Model sweeps: many models over one stimulus set as one resumable run, compared on the brain data.

    config.py    SweepConfig (models, shared run and encoding options), the store of each model
    run.py       run_sweep: model after model, extract -> encode, with a record of what finished
    compare.py   comparison table, ranking per ROI, plot
"""

from neuropredictor.sweep.config import SweepConfig, SweepModel, slug
from neuropredictor.sweep.run import SweepFailed, failure_message, run_sweep

__all__ = ["SweepConfig", "SweepFailed", "SweepModel", "failure_message", "run_sweep", "slug"]
