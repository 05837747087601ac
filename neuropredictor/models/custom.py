"""The user's own models: `custom:package.module:factory` or `custom:path/to/file.py:factory`.

The factory returns an `nn.Module`, or `(module, transform)` where transform maps a PIL image to a (C, H, W)
tensor. If it accepts a `pretrained` argument, it receives the CLI's choice. Without a transform, the
ImageNet evaluation preprocessing (resize 256, centre crop 224, normalise) is used. The model's weights are
named by their checksum (`state-sha256:`), and its code by the checksum of the file that defines the factory
(not of what that file imports; not for a factory defined in `__main__`, a notebook or script); a `.py` file
edited since it was imported is executed again.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from torch import nn

from neuropredictor.errors import ModelSpecError
from neuropredictor.models.base import CODE, STATE_DIGEST, Transform, imagenet_transform
from neuropredictor.models.spec import ModelSpec


_STAMP = "__neuropredictor_file_stamp__"  # (size, mtime) of the .py file a module was executed from


def _import_target(target: str):
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ModelSpecError(f"custom model file {path} does not exist")
        # a stable module name, registered in sys.modules, so objects defined there pickle into workers
        name = "neuropredictor_custom_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        known = sys.modules.get(name)
        if known is not None and getattr(known, _STAMP, None) == stamp:
            return known
        # new, or edited since it was imported: executed (again), so that an edited model is the one loaded
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        setattr(module, _STAMP, stamp)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {target!r} for the custom model: {exc}") from exc


def load(spec: ModelSpec, pretrained: bool) -> tuple[nn.Module, Transform, str]:
    target, _, factory_name = spec.name.rpartition(":")
    module = _import_target(target)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ModelSpecError(f"{target} has no factory {factory_name!r}; callables there: {names}")
    accepts_pretrained = "pretrained" in inspect.signature(factory).parameters
    result = factory(pretrained=pretrained) if accepts_pretrained else factory()
    model, transform = result if isinstance(result, tuple) else (result, None)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"custom factory {spec.name} returned {type(model).__name__}, not a torch.nn.Module")
    # named by the checksum of their weights (`load_model` takes it, unless a weights file replaces them),
    # random or not: the user's code decides the model, so a retrained checkpoint behind the same factory, or
    # a factory redefined in a notebook, is another model; and by its file's, so that a forward pass fixed
    # since is too (a resume would add the new code's rows to the old code's)
    setattr(model, CODE, code_digest(spec))
    return model, transform or imagenet_transform(), STATE_DIGEST


def code_digest(spec: ModelSpec) -> str | None:
    """"sha256:<checksum>" of the file that defines the spec's factory (found without running it, for a sweep
    to tell whether a store is current); None for `__main__` (a notebook, or a driver script edited freely)
    and for a module without a file."""
    target = spec.name.rpartition(":")[0]
    if target.endswith(".py"):
        path: str | Path | None = Path(target).expanduser().resolve()
    elif target == "__main__":
        return None
    else:
        path = getattr(sys.modules.get(target), "__file__", None)
        if path is None:
            try:
                found = importlib.util.find_spec(target)
            except (ImportError, ValueError):
                return None
            path = found.origin if found is not None else None
    if not path or not Path(path).is_file():
        return None
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def list_models(pattern: str | None = None) -> list[str]:
    return []  # user code is named by its spec; there is nothing to enumerate
