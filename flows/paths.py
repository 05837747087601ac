"""A deployed run's paths: a worker runs each flow run in a temporary folder of its own, deleted afterwards."""

from __future__ import annotations

import os

from prefect.runtime import deployment
from pydantic import BaseModel


def refuse_relative_paths(*configs: BaseModel) -> None:
    """In a run of a deployment, ValueError naming each relative local path of the configs' LOCATIONS fields: it
    would be read from, or written into, the run's temporary folder (a store written there, the run Completed,
    was deleted with it). Absolute paths (on the worker's machine) and URLs are what such a run can use."""
    if deployment.id is None:  # the command line or a notebook: the user's own working folder
        return
    relative = []
    for config in configs:
        for name in type(config).LOCATIONS:
            value = getattr(config, name)
            for path in value if isinstance(value, list) else [value]:
                if isinstance(path, str) and "://" not in path and not os.path.isabs(os.path.expanduser(path)):
                    relative.append(f"{name}={path!r}")
    if relative:
        raise ValueError(f"relative path(s) in a deployed run: {', '.join(dict.fromkeys(relative))}. A worker runs "
                         "each flow run in a temporary folder of its own, deleted afterwards: give absolute paths "
                         "on the worker's machine, or URLs (s3://...).")
