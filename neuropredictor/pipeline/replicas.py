"""Model replicas: one per device, loaded once and reused for every shard of a run (and released when the
device's next run needs another model)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from neuropredictor.config import ExtractConfig
from neuropredictor.errors import NeuroPredictorError
from neuropredictor.extractor import Extractor
from neuropredictor.models import LoadedModel, load_model
from neuropredictor.models.base import STATE_DIGEST
from neuropredictor.store import LayerSpec

if TYPE_CHECKING:  # imported when used: torchvision's decoders cost start-up time nobody else needs
    from neuropredictor.device_decode import DeviceDecoder


@dataclass
class Runner:
    """One model replica on one device, with its hooks in place; reused for every shard of a run."""

    model: LoadedModel
    extractor: Extractor
    device: torch.device
    decoder: DeviceDecoder | None = None  # decode="device": decoding and preprocessing on `device`

    def layer_specs(self) -> list[LayerSpec]:
        return [LayerSpec(p.name, p.out_shape, str(p.reduction)) for p in self.extractor.plan.values()]


# One replica per device at a time: a run over many models (a sweep, a notebook loop) keeps GPU memory
# and RAM flat, since loading the next model on a device releases the one before.
_RUNNERS: dict[str, tuple[tuple, Runner]] = {}
_RUNNERS_LOCK = threading.Lock()


def check_device(name: str | torch.device) -> torch.device:
    """The torch device `name` means, or a NeuroPredictorError when this machine cannot run on it."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise NeuroPredictorError(f"unknown device {str(name)!r}: use `device` auto, cpu, cuda, cuda:N (or "
                                  "several, comma-separated) or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise NeuroPredictorError(f"device {str(name)!r} needs a CUDA GPU, but PyTorch sees none on this machine "
                                      "(no driver, or a CPU-only torch): use `device` cpu, or `device` auto to "
                                      "use GPUs where there are some")
        if dev.index is not None and dev.index >= count:
            raise NeuroPredictorError(f"device {str(name)!r} does not exist: this machine has {count} CUDA GPU(s), "
                                      f"cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise NeuroPredictorError(f"device {str(name)!r} is not available on this machine: use `device` cpu")
    elif dev.type != "cpu":
        raise NeuroPredictorError(f"device {str(name)!r} is not supported: use `device` auto, cpu, cuda, cuda:N or mps")
    return dev


def _device(config: ExtractConfig, device: str | torch.device | None) -> torch.device:
    dev = check_device(device if device is not None else config.resolved_devices()[0])
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" share one replica
    return dev


def get_runner(config: ExtractConfig, device: str | torch.device | None = None) -> Runner:
    """The process's replica for this model/layers/device, loaded on first use (never per shard); it
    replaces the device's previous replica, if that was another one."""
    dev = _device(config, device)
    key = config.replica_key()
    with _RUNNERS_LOCK:
        cached = _RUNNERS.get(str(dev))
        if cached is not None and cached[0] == key:
            return cached[1]
        if cached is not None:
            del cached
            release_runners(str(dev))
        model = load_model(config.model, pretrained=config.pretrained, weights=config.weights)
        decoder = None
        if config.decode == "device":
            from neuropredictor.device_decode import DeviceDecoder

            decoder = DeviceDecoder(model.transform, dev, model.input_size)
        ex = Extractor(model, config.layers, reduce=config.reduce, device=dev, precision=config.precision,
                       channels_last=config.channels_last, srp_seed=config.srp_seed, compile=config.compile,
                       batch_size=config.batch_size)
        runner = Runner(model, ex.__enter__(), dev, decoder)
        _RUNNERS[str(dev)] = (key, runner)
        return runner


def forget_self_loaded() -> None:
    """Drop cached replicas of custom factories (their weights named by their checksum): the cache key (the
    options) cannot tell a retrained checkpoint behind the factory, or a factory redefined in a notebook, so
    each run (`validate`) calls the factory again."""
    with _RUNNERS_LOCK:
        stale = [dev for dev, (_key, runner) in _RUNNERS.items() if runner.model.weights.startswith(STATE_DIGEST)]
    for dev in stale:
        release_runners(dev)  # its memory (a GPU's) goes before the factory loads the model again


def release_runners(device: str | None = None) -> None:
    """Drop the cached replica of a device (every device by default) and give its memory back. A shard
    still running on it keeps its own reference until it ends."""
    import gc

    for dev in [device] if device is not None else list(_RUNNERS):
        _RUNNERS.pop(dev, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
