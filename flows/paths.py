"""A deployed run's paths: a worker that pulls the flow's code runs each flow run in a temporary folder of its
own, deleted afterwards."""

from __future__ import annotations

import os
import tempfile

from prefect.runtime import deployment
from pydantic import BaseModel


def refuse_relative_paths(*configs: BaseModel) -> None:
    """In a run of a deployment working in a temporary folder, ValueError naming each relative local path of the
    configs' LOCATIONS fields that is not there: an output (a store written there, the run Completed, was deleted
    with it) or an input the code did not bring. A run working elsewhere (`serve()`, a worker's `working_dir`)
    takes paths relative to its folder, as the command line does; inputs shipped with the code are found."""
    if deployment.id is None:  # the command line or a notebook: the user's own working folder
        return
    here, temporary = os.path.realpath(os.getcwd()), os.path.realpath(tempfile.gettempdir())
    if os.path.commonpath([here, temporary]) != temporary:
        return
    relative = []
    for config in configs:
        for name in type(config).LOCATIONS:
            value = getattr(config, name)
            for path in value if isinstance(value, list) else [value]:
                if not isinstance(path, str):
                    continue
                local = path.removeprefix("file://")
                if "://" not in local and not os.path.isabs(os.path.expanduser(local)) and not os.path.exists(local):
                    relative.append(f"{name}={path!r}")
    if relative:
        raise ValueError(f"relative path(s) in a deployed run: {', '.join(dict.fromkeys(relative))}. This run works in "
                         f"a temporary folder ({here}), deleted after it: give absolute paths on the worker's machine, "
                         "or URLs (s3://...).")
