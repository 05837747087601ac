"""The user's own models: `custom:package.module:factory` or `custom:path/to/file.py:factory`.

The factory returns an `nn.Module`, or `(module, transform)` where transform maps a PIL image to a (C, H, W)
tensor. If it accepts a `pretrained` argument, it receives the CLI's choice. Without a transform, the
ImageNet evaluation preprocessing (resize 256, centre crop 224, normalise) is used. The model's weights are
named by their checksum (`state-sha256:`), and its code by the checksum of the file that defines the factory
(not of what that file imports; not for a factory defined in `__main__`, a notebook or script). A `.py` file
edited since it was executed is executed again; a module imported by name and edited since is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

from torch import nn

from neuropredictor.config import file_stamp
from neuropredictor.errors import ModelSpecError
from neuropredictor.models.base import CODE, STATE_DIGEST, Transform, imagenet_transform
from neuropredictor.models.spec import ModelSpec


_RAN = "__neuropredictor_ran__"  # ((size, mtime), checksum) of the file a module was executed from


def _digest(source: bytes) -> str:
    return "sha256:" + hashlib.sha256(source).hexdigest()


def _import_target(target: str):
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ModelSpecError(f"custom model file {path} does not exist")
        # a stable module name, registered in sys.modules, so objects defined there pickle into workers
        name = "neuropredictor_custom_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        stamp = file_stamp(path)
        known = sys.modules.get(name)
        if known is not None and getattr(known, _RAN, (None,))[0] == stamp:
            return known
        # new, or edited since it was imported: executed (again), so that an edited model is the one loaded;
        # from the bytes read once, which its checksum is of
        source = path.read_bytes()
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
        setattr(module, _RAN, (stamp, _digest(source)))
        sys.modules[name] = module
        try:
            exec(compile(source, str(path), "exec"), module.__dict__)
        except Exception:
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {target!r} for the custom model: {exc}") from exc


def _ran_digest(module_name: str | None) -> str | None:
    """The checksum of the file the module was executed from, as it ran: taken when first seen here (a file
    edited after the module was imported, by this library or the user, is refused, as its old code would
    run); None for `__main__` (a notebook, or a driver script edited freely) and a module without a file."""
    module = sys.modules.get(module_name or "")
    path = getattr(module, "__file__", None)
    if module is None or module_name == "__main__" or not path or not os.path.isfile(path):
        return None
    ran = getattr(module, _RAN, None)
    if ran is None:
        ran = (file_stamp(path), _digest(Path(path).read_bytes()))
        with contextlib.suppress(AttributeError, TypeError):  # an extension module may refuse attributes
            setattr(module, _RAN, ran)
    elif ran[0] != file_stamp(path):
        raise ModelSpecError(
            f"{path} was edited after this process imported it: the model would run its old code. Restart the "
            f"process, or name the file in the spec (custom:{path}:FACTORY), which is executed again when edited")
    return ran[1]


def code_digest(spec: ModelSpec) -> str | None:
    """The checksum of the file that defines the spec's factory (`_ran_digest`), without calling the factory
    (a sweep tells whether a store is current)."""
    target, _, factory_name = spec.name.rpartition(":")
    factory = getattr(_import_target(target), factory_name, None)
    return _ran_digest(getattr(factory, "__module__", None))


def load(spec: ModelSpec, pretrained: bool) -> tuple[nn.Module, Transform, str]:
    target, _, factory_name = spec.name.rpartition(":")
    module = _import_target(target)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ModelSpecError(f"{target} has no factory {factory_name!r}; callables there: {names}")
    code = _ran_digest(getattr(factory, "__module__", None))  # before the factory runs (an edit meanwhile)
    accepts_pretrained = "pretrained" in inspect.signature(factory).parameters
    result = factory(pretrained=pretrained) if accepts_pretrained else factory()
    model, transform = result if isinstance(result, tuple) else (result, None)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"custom factory {spec.name} returned {type(model).__name__}, not a torch.nn.Module")
    # named by the checksum of their weights (`load_model` takes it, unless a weights file replaces them),
    # random or not: the user's code decides the model, so a retrained checkpoint behind the same factory, or
    # a factory redefined in a notebook, is another model; and by its file's, so that a forward pass fixed
    # since is too (a resume would add the new code's rows to the old code's)
    setattr(model, CODE, code)
    return model, transform or imagenet_transform(), STATE_DIGEST


def list_models(pattern: str | None = None) -> list[str]:
    return []  # user code is named by its spec; there is nothing to enumerate
