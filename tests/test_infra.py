"""Static checks of the deployment infrastructure in infra/: docker compose file, Dockerfile, Kubernetes
work pool base job template, Helm values, Secret example. Offline and fast: nothing is built or started
(no container engine or cluster needed); `docker compose config` runs only where the Compose plugin is
installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
DOCKERFILE = INFRA / "Dockerfile"
TEMPLATE = INFRA / "k8s" / "base-job-template.json"
WORKER_VALUES = INFRA / "k8s" / "worker-values.yaml"
SECRET = INFRA / "k8s" / "secret-example.yaml"
CONTROL_WORKER = INFRA / "k8s" / "control-worker.yaml"
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


# ---------------------------------------------------------------------------------------- helpers

def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE in .env.example: {line!r}"
            values[key.strip()] = value.strip()
    return values


def _strings(node):
    """Every string (keys and values) in a parsed YAML/JSON document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


# `$$` is a literal dollar in compose files; ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $VAR
_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)((?::?[-?+]).*?)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _interpolations(text: str) -> list[tuple[str, str]]:
    """(variable, modifier) pairs used in a compose string; modifier is '' when bare."""
    found = []
    for match in _INTERPOLATION.finditer(text):
        if match.group(0) == "$$":
            continue
        name = match.group(1) or match.group(3)
        modifier = match.group(2) or ""
        found.append((name, modifier))
    return found


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue  # comments (also inside continuations) and blank lines
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return instructions


def _dockerfile_args() -> dict[str, str]:
    return {name: value for kw, args in _dockerfile_instructions() if kw == "ARG" and "=" in args
            for name, value in [args.split("=", 1)]}


def _template() -> dict:
    return json.loads(TEMPLATE.read_text())


def _defaults(template: dict) -> dict:
    """Variable defaults as the worker uses them (None defaults are dropped, as Prefect does)."""
    return {name: spec["default"] for name, spec in template["variables"]["properties"].items()
            if spec.get("default") is not None}


def _rendered_manifest(template: dict, **overrides) -> dict:
    from prefect.utilities.templating import apply_values

    config = apply_values(template["job_configuration"], {**_defaults(template), **overrides})
    return config["job_manifest"]


def _pinned(package: str) -> str:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for requirement in pyproject["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(package)}\s*==\s*([^;\s]+)", requirement.strip())
        if match:
            return match.group(1)
    pytest.fail(f"{package} is not pinned with == in pyproject.toml")


# ---------------------------------------------------------------------------------- docker compose

def test_compose_has_the_services():
    services = _compose()["services"]
    assert {"postgres", "prefect-server", "minio", "minio-init", "gpu-worker"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in (service.get("depends_on") or {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


def test_compose_gpu_worker_build_points_at_the_dockerfile():
    build = _compose()["services"]["gpu-worker"]["build"]
    context = (INFRA / build["context"]).resolve()  # relative to the compose file's directory
    assert context == REPO, "the build context must be the repository root (the Dockerfile's COPY paths)"
    dockerfile = (context / build.get("dockerfile", "Dockerfile")).resolve()  # relative to the context
    assert dockerfile == DOCKERFILE and dockerfile.is_file()


def test_compose_gpu_worker_reserves_nvidia_gpus_and_shared_memory():
    worker = _compose()["services"]["gpu-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert worker.get("shm_size"), "DataLoader workers need more than Docker's 64 MB of /dev/shm"


def test_compose_gpu_worker_environment():
    services = _compose()["services"]
    env = services["gpu-worker"]["environment"]
    for key in ("PREFECT_API_URL", "PREFECT_WORK_POOL", "NEUROPREDICTOR_WORKER_ID", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        assert key in env, key
    assert env["PREFECT_API_URL"] in ("http://prefect-server:4200/api",
                                      "${WORKER_PREFECT_API_URL:-http://prefect-server:4200/api}")
    assert env["AWS_ENDPOINT_URL"] in ("http://minio:9000", "${WORKER_AWS_ENDPOINT_URL:-http://minio:9000}")
    # the worker's S3 credentials are MinIO's root credentials
    minio = services["minio"]["environment"]
    for aws, root in (("AWS_ACCESS_KEY_ID", "MINIO_ROOT_USER"), ("AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD")):
        assert [v for v, _ in _interpolations(env[aws])] == [v for v, _ in _interpolations(minio[root])] == [root]
    # the pool the worker polls by default is the pool of extract/local in deployments/prefect.yaml
    if PREFECT_YAML.exists():
        pools = {d["work_pool"]["name"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
                 if d.get("name") == "local"}
        default_pool = re.fullmatch(r"\$\{PREFECT_WORK_POOL:-([^}]+)\}", env["PREFECT_WORK_POOL"]).group(1)
        assert pools == {default_pool}, (pools, default_pool)


def test_compose_server_uses_postgres():
    services = _compose()["services"]
    url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://"), url
    assert "@postgres:5432/" in url
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["postgres"]["healthcheck"]["test"]
    assert "postgres:16" in services["postgres"]["image"]


def test_compose_minio_init_creates_the_bucket_idempotently():
    init = _compose()["services"]["minio-init"]
    command = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert "mb" in command and "--ignore-existing" in command
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"


def test_compose_named_volumes_are_declared():
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name} mounts undeclared volume {source}"


def test_compose_variables_have_defaults_or_are_in_env_example():
    documented = _env_example()
    used = [pair for text in _strings(_compose()) for pair in _interpolations(text)]
    assert used, "no ${VAR} found: the interpolation regex is broken"
    for name, modifier in used:
        has_default = modifier.startswith(("-", ":-"))
        assert has_default or name in documented, f"${{{name}}} has no default and is not in infra/.env.example"


def test_compose_reads_no_variable_the_readme_exports_for_the_host():
    # compose takes the shell's variables before infra/.env: after the README's `export PREFECT_API_URL=
    # http://localhost:4200/api` (for the host's CLI), the worker pointed at its own localhost
    exported = set(re.findall(r"^\s*export ([A-Z_][A-Z0-9_]*)=", (REPO / "README.md").read_text(), re.MULTILINE))
    assert "PREFECT_API_URL" in exported
    used = {name for text in _strings(_compose()) for name, _ in _interpolations(text)}
    assert not used & exported


def test_parents_that_wait_on_child_runs_go_to_the_control_queue():
    # a parent with `deployment` set only waits on its children: on a cluster only the control worker
    # serves its queue (infra/k8s/control-worker.yaml); elsewhere it would stay Scheduled
    control = yaml.safe_load((INFRA / "k8s" / "control-worker.yaml").read_text())
    args = control["spec"]["template"]["spec"]["containers"][0]["args"]
    queue = args[args.index("--work-queue") + 1]
    parents = [d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
               if "deployment" in (d.get("parameters") or {}).get("params", {})]
    assert {d["name"] for d in parents} >= {"distributed", "sweep-gpu"}
    for d in parents:
        assert d["work_pool"].get("work_queue_name") == queue, d["name"]


def test_env_example_holds_no_real_secrets():
    for key, value in _env_example().items():
        if any(word in key for word in ("PASSWORD", "SECRET", "TOKEN")):
            assert value == "" or "change-me" in value, f"{key} in .env.example must be a placeholder"
    assert len(_env_example()["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO refuses shorter passwords


def test_docker_compose_config_is_valid():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose plugin not installed")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "daemon" in result.stderr.lower():
        pytest.skip("docker compose config needs a daemon here")
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------- Dockerfile

def test_dockerfile_has_a_base_image_and_a_non_root_user():
    instructions = _dockerfile_instructions()
    keywords = [kw for kw, _ in instructions]
    assert "FROM" in keywords
    assert set(keywords[:keywords.index("FROM")]) <= {"ARG"}, "only ARG may come before FROM"
    users = [args for kw, args in instructions if kw == "USER"]
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"the last USER is root: {users[-1]}"


def test_dockerfile_base_image_matches_the_torch_pin():
    args = _dockerfile_args()
    torch, torchvision = _pinned("torch"), _pinned("torchvision")
    assert args["TORCH_VERSION"] == torch, "infra/Dockerfile TORCH_VERSION must equal pyproject's torch pin"
    assert args["TORCHVISION_VERSION"] == torchvision
    base = args["BASE_IMAGE"]
    if base.startswith("pytorch/pytorch:"):
        assert base.split(":", 1)[1].startswith(torch + "-"), f"{base} does not carry torch {torch}"


def test_dockerfile_copy_sources_exist_in_the_build_context():
    ignored = {line.strip().rstrip("/") for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copies = [args for kw, args in _dockerfile_instructions() if kw in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in args.split() if not p.startswith("--")]
        assert not any(p.startswith("--from") for p in args.split()), "no multi-stage COPY expected"
        for source in parts[:-1]:
            path = REPO / source  # the build context is the repository root
            assert path.exists(), f"COPY source {source} does not exist in the repository"
            assert source.rstrip("/").split("/")[0] not in ignored, f"COPY source {source} is dockerignored"


def test_dockerfile_installs_the_project_and_starts_a_worker():
    instructions = _dockerfile_instructions()
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert 'pip install "/app[hf]"' in runs
    env = " ".join(args for kw, args in instructions if kw == "ENV")
    assert "HF_HOME=" in env and "TORCH_HOME=" in env
    assert ("WORKDIR", "/app") in instructions
    cmd = [args for kw, args in instructions if kw == "CMD"][-1]
    assert "prefect worker start" in cmd and "$PREFECT_WORK_POOL" in cmd


def test_dockerfile_dependency_layer_builds_from_pyproject_alone(tmp_path):
    """The first layer's stand-in packages let setuptools build the metadata: every package in
    pyproject's list must exist (a package added to the project once broke the image build)."""
    import os
    import sys

    step = next(args for kw, args in _dockerfile_instructions() if kw == "RUN" and "pip uninstall" in args)
    standins = step[:step.index('pip install "/app[hf]"')]  # what runs before the dependencies install
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", standins], cwd=tmp_path, env=env, check=True, capture_output=True)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path / "wheel"), str(tmp_path)],
                           cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    assert list((tmp_path / "wheel").glob("neuropredictor-*.whl"))


# --------------------------------------------------------------------------- Kubernetes work pool

def test_base_job_template_shape():
    template = _template()
    assert set(template) == {"job_configuration", "variables"}
    assert template["variables"]["type"] == "object" and template["variables"]["properties"]
    manifest = template["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    pod = manifest["spec"]["template"]["spec"]
    # what prefect-kubernetes' worker requires of every job manifest
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    assert pod["containers"][0]["name"] == "prefect-job"
    assert pod["containers"][0]["args"] == "{{ command }}"


def test_base_job_template_is_accepted_by_the_prefect_server():
    """The server's own check on `work-pool create`: every placeholder is a declared variable."""
    from prefect.server.schemas.actions import WorkPoolCreate

    WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=_template())


def test_base_job_template_placeholders_are_declared_and_used():
    from prefect.utilities.templating import find_placeholders

    template = _template()
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    declared = set(template["variables"]["properties"])
    assert used <= declared, f"undeclared (typo?): {sorted(used - declared)}"
    assert declared <= used, f"declared but never used in job_configuration: {sorted(declared - used)}"


def test_base_job_template_defaults_validate_against_the_variables_schema():
    from prefect.utilities.schema_tools import is_valid_schema, validate

    template = _template()
    is_valid_schema(template["variables"], preprocess=False)
    validate(_defaults(template), template["variables"], raise_on_error=True, preprocess=True,
             ignore_required=True, allow_none_with_default=True)


def test_base_job_template_gpu_node_placement_secret_and_shm():
    template = _template()
    properties = template["variables"]["properties"]
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert properties["gpu_count"]["type"] == "integer" and properties["gpu_count"]["default"] == 1
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
    assert properties["node_selector"]["default"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in properties["tolerations"]["default"]
    assert properties["image"]["default"] == "ghcr.io/your-lab/neuropredictor-worker:latest"
    for name in ("cpu_request", "memory_request"):
        assert container["resources"]["requests"][name.split("_")[0]] == f"{{{{ {name} }}}}"

    rendered = _rendered_manifest(template)
    pod = rendered["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}  # unset cpu/memory limits are dropped
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert container["envFrom"] == [{"secretRef": {"name": "neuropredictor-s3"}}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert rendered["metadata"]["namespace"] == "prefect"
    assert "serviceAccountName" not in pod  # unset variable: the key is dropped, not sent empty

    four = _rendered_manifest(template, gpu_count=4)["spec"]["template"]["spec"]["containers"][0]
    assert four["resources"]["limits"]["nvidia.com/gpu"] == 4


def test_deployments_job_variables_fit_the_gpu_pool():
    """deployments/prefect.yaml's job_variables for gpu-k8s are variables of this template."""
    if not PREFECT_YAML.exists():
        pytest.skip("deployments/prefect.yaml not written yet")
    from prefect.utilities.schema_tools import validate

    template = _template()
    gpu_deployments = [d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
                       if (d.get("work_pool") or {}).get("name") == "gpu-k8s"]
    for deployment in gpu_deployments:
        job_variables = deployment["work_pool"].get("job_variables") or {}
        unknown = set(job_variables) - set(template["variables"]["properties"])
        assert not unknown, f"{deployment['name']}: job_variables not in the template: {sorted(unknown)}"
        validate({**_defaults(template), **job_variables}, template["variables"], raise_on_error=True,
                 preprocess=True, ignore_required=True, allow_none_with_default=True)


def test_helm_values_and_secret_example():
    values = yaml.safe_load(WORKER_VALUES.read_text())
    worker = values["worker"]
    assert worker["config"]["workPool"] == "gpu-k8s"
    assert worker["config"]["type"] == "kubernetes"
    assert worker["apiConfig"] in ("selfHostedServer", "server")

    secret = yaml.safe_load(SECRET.read_text())
    properties = _template()["variables"]["properties"]
    assert (secret["apiVersion"], secret["kind"]) == ("v1", "Secret")
    assert secret["metadata"]["name"] == properties["s3_secret_name"]["default"]
    assert secret["metadata"]["namespace"] == properties["namespace"]["default"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert all(value == "change-me" for key, value in secret["stringData"].items() if "KEY" in key)


def test_control_worker_manifest():
    """The CPU worker for the distributed parent: same image, same Secret, the `control` queue."""
    manifest = yaml.safe_load(CONTROL_WORKER.read_text())
    properties = _template()["variables"]["properties"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("apps/v1", "Deployment")
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == properties["image"]["default"]
    assert container["envFrom"] == [{"secretRef": {"name": properties["s3_secret_name"]["default"]}}]
    args = container["args"]
    assert args[:3] == ["prefect", "worker", "start"]
    pool, queue = args[args.index("--pool") + 1], args[args.index("--work-queue") + 1]
    if PREFECT_YAML.exists():
        parent = next(d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"] if d["name"] == "distributed")
        assert (pool, queue) == (parent["work_pool"]["name"], parent["work_pool"].get("work_queue_name", "default"))
    assert "nvidia.com/gpu" not in str(container.get("resources")), "the parent needs no GPU"
