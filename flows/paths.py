"""A deployed run's paths: a worker runs each flow run in a folder of its own (a temporary one for pulled code, a
pod's), which the user never sees again."""

from __future__ import annotations

import glob
import os

from prefect.runtime import deployment
from pydantic import BaseModel


def refuse_relative_paths(*configs: BaseModel) -> None:
    """In a run of a deployment, ValueError naming each relative local path of the configs' LOCATIONS fields that
    is an output (OUTPUTS), or an input that is not there: the run's folder is the worker's, a temporary one for
    pulled code (a store written there, the run Completed, was deleted with it) or a pod's, gone with it. Inputs
    shipped with the code are found; outputs want absolute paths or URLs."""
    if deployment.id is None:  # the command line or a notebook: the user's own working folder
        return
    relative = []
    for config in configs:
        for name in type(config).LOCATIONS:
            value = getattr(config, name)
            for path in value if isinstance(value, list) else [value]:
                if not isinstance(path, str):
                    continue
                local = path.removeprefix("file://")
                if "://" in local or os.path.isabs(os.path.expanduser(local)):
                    continue
                if name in type(config).OUTPUTS or not _there(local):
                    relative.append(f"{name}={path!r}")
    if relative:
        raise ValueError(f"relative path(s) in a deployed run: {', '.join(dict.fromkeys(relative))}. This run works in "
                         f"its worker's folder ({os.getcwd()}), which may be temporary: give absolute paths on the "
                         "worker's machine, or URLs (s3://...).")


def _there(path: str) -> bool:
    """Whether a local input is there: a file or folder, a glob's match, or a brace pattern's folder."""
    if os.path.exists(path):  # also a name with [ or { in it
        return True
    if "{" in path:  # a brace pattern: the folder above its first brace
        return os.path.isdir(os.path.dirname(path[:path.index("{")]) or ".")
    return any(c in path for c in "*?[") and bool(glob.glob(path))
