"""What one extraction run is: `ExtractConfig`, the one options model of the library, the command line
and the Prefect flows (they take their fields, defaults and help from here).

Every field is marked with the roles it plays, and everything that depends on a role is derived from the
marks: which fields must match to resume a store (`IDENTITY`), which build a model replica that can be
reused (`REPLICA`), and the rest, which only change where and how fast a run goes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator


class Role:
    """A mark on a config field (pydantic keeps it in the field's metadata)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Role({self.name!r})"


IDENTITY = Role("identity")  # changes the stored numbers: a store made with another value is another run
REPLICA = Role("replica")  # changes the model replica: a cached replica is reused only when these agree


def split_commas(items: str | Sequence[str]) -> list[str]:
    """"a, b", ["a", "b"] and ["a,b"] (an option given several times) all give ["a", "b"]: lists as command
    lines and forms write them."""
    return [s.strip() for i in ([items] if isinstance(items, str) else items) for s in i.split(",") if s.strip()]


def comma_list(cls: type, v: Any) -> Any:
    """Validator (mode="before") of list fields: split_commas for a string or a list of strings."""
    if isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(i, str) for i in v)):
        return split_commas(v)
    return v


# A list of names that also takes "a,b" (`comma_list`): the JSON schema says so, since a Prefect server checks
# a deployment's run parameters against it (`"layers": "layer4"` was refused there).
Names = Annotated[list[str], WithJsonSchema({"anyOf": [{"type": "array", "items": {"type": "string"}},
                                                       {"type": "string"}]})]


def path_text(cls: type, v: Any) -> Any:
    """Validator (mode="before") of location fields: a `pathlib.Path` (or a list of them) as its text; an empty
    one is refused (`--out ""` wrote a store's files into the current folder)."""
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    elif isinstance(v, (list, tuple)):
        v = [os.fspath(i) if isinstance(i, os.PathLike) else i for i in v]
    if any(isinstance(i, str) and not i.strip() for i in (v if isinstance(v, list) else [v])):
        raise ValueError("is empty: give a local path or a URL")
    return v


class ExtractConfig(BaseModel):
    """Everything one extraction run needs. Fields marked IDENTITY form the store's identity; the others
    (batch size, workers, device, retries) may differ between runs that resume one store."""

    # hide_input_in_errors: a validation error must not print storage options (credentials) back
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    corpus: str | list[str] = Field(description="WebDataset shards: a directory, a brace pattern "
                                    "(shards/train-{000000..000099}.tar), a URL (s3://...), or a list of them; or a "
                                    "local folder of images (shards are made of it beside the output store).")
    model: Annotated[str, IDENTITY, REPLICA] = Field(
        description="Model spec SOURCE:NAME[@TAG], e.g. timm:resnet50, torchvision:alexnet, "
        "openclip:ViT-B-32@laion2b_s34b_b79k, clip:ViT-B-32, hf:ORG/NAME, custom:module:factory.")
    layers: Annotated[Names, IDENTITY, REPLICA] = Field(
        description="Layer names or globs, e.g. `layer3`, `layer4` or `blocks.*` (a `*` matches within one "
        "dotted segment, `**` across segments); list them with `neuropredictor layers SPEC`.")
    out: str = Field(description="Output Zarr store URL (local path or s3://bucket/prefix).")
    reduce: Annotated[str, IDENTITY, REPLICA] = Field(
        "full", description="One reduction for every layer (full, flatten, avgpool, cls, pool:K, srp:D), or per "
        "layer: 'layer3=pool:2,layer4=avgpool' (layer names or globs, as in `layers`).")
    pretrained: Annotated[bool, IDENTITY, REPLICA] = Field(
        True, description="Use the source's pretrained weights; False gives random weights (no download).")
    weights: Annotated[str | None, IDENTITY, REPLICA] = Field(
        None, description="Local checkpoint to load: .safetensors or a torch state dict.")
    dtype: Annotated[Literal["float32", "float16"], IDENTITY] = Field(
        "float32", description="Dtype of the stored features.")
    precision: Annotated[Literal["fp32", "bf16", "fp16"], IDENTITY, REPLICA] = Field(
        "fp32", description="Autocast precision of the forward pass.")
    decode: Annotated[Literal["cpu", "device"], IDENTITY, REPLICA] = Field(
        "cpu", description="Where images are decoded and preprocessed: 'cpu' (PIL in the decode workers) or "
        "'device' (JPEGs decoded in batches by nvJPEG on the GPU, preprocessing as tensor ops there), for when "
        "CPU decoding is the bottleneck.")
    srp_seed: Annotated[int, IDENTITY, REPLICA] = Field(0, description="Seed of the sparse random projections (srp:D).")
    channels_last: Annotated[bool, REPLICA] = Field(False, description="Run conv nets in channels_last memory format.")
    compile: Annotated[bool, REPLICA] = Field(
        False, description="torch.compile the model (one compilation per replica, worth it for long runs on a "
        "GPU; numbers equal eager within float rounding).")
    batch_size: int = Field(64, ge=1, description="Images per forward pass.")
    num_workers: int | None = Field(None, ge=0, description="DataLoader decode workers per device "
                                    "(default: the machine's cores, up to 8).")
    device: str = Field("auto", description="Where the model runs: 'auto' (every CUDA device, else the CPU), 'cpu', "
                        "'cuda', 'cuda:1', or a comma-separated list ('cuda:0,cuda:1'): one model replica and one "
                        "shard at a time on each.")
    compression: str = Field("zstd", description="Zarr compression: zstd, zstd:LEVEL, blosc, gzip, none.")
    retries: int = Field(2, ge=0, description="Retries of a failed shard before it counts as failed.")
    retry_delay_seconds: float = Field(10.0, ge=0, description="Delay before the first retry of a shard; doubles "
                                       "each retry, with jitter.")
    # repr=False: a config shown in a notebook or a log line must not show the keys it may hold
    storage_options: dict[str, Any] | None = Field(None, repr=False, description="fsspec storage options (e.g. "
                                                   "endpoint_url); never written to the manifest.")
    overwrite: bool = Field(False, description="Replace an existing store made with another configuration (only "
                            "the store's own objects are deleted; a store another run is extracting into is "
                            "never replaced).")
    verify: bool = Field(False, description="Before resuming, read every committed shard back and compare it with "
                         "the checksums written with it; damaged shards are extracted again, and damaged zarr metadata "
                         "is written again from the plan.")

    _split = field_validator("layers", mode="before")(comma_list)
    LOCATIONS: ClassVar[tuple[str, ...]] = ("corpus", "out", "weights")  # the fields that name files or folders
    OUTPUTS: ClassVar[tuple[str, ...]] = ("out",)  # those written
    _paths = field_validator(*LOCATIONS, mode="before")(path_text)

    @classmethod
    def fields_with(cls, role: Role) -> list[str]:
        """The names of the fields marked with `role`, in declaration order."""
        return [name for name, f in cls.model_fields.items() if any(m is role for m in f.metadata)]

    def replica_key(self) -> tuple:
        """What a model replica depends on (the device aside); local files also by their sizes and mtimes (a
        weights file, a model folder `hf:/dir`, a custom model's `.py`), so that a checkpoint saved again at
        the same path, or an edited model file, is loaded again."""
        key = tuple((name, _hashable(getattr(self, name))) for name in self.fields_with(REPLICA))
        source, _, rest = self.model.partition(":")
        # only what a loader reads from disk (not a folder that happens to share a hub model's name)
        paths = [self.weights or "", rest.rpartition("@")[0] or rest if source == "hf" else "",
                 rest.rpartition(":")[0] if source == "custom" and rest.rpartition(":")[0].endswith(".py") else "",
                 rest.rpartition("@")[2] if source in ("openclip", "clip") and "@" in rest else ""]
        return key + tuple(("local", path, file_stamp(path)) for path in dict.fromkeys(paths)
                           if path and os.path.exists(path))

    def resolved_devices(self) -> list[str]:
        """The devices a run uses ('auto': every CUDA device, else the CPU)."""
        if self.device.strip() != "auto":
            return [d.strip() for d in self.device.split(",") if d.strip()]
        import torch

        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"]

    def resolved_workers(self) -> int:
        return self.num_workers if self.num_workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))


_STAMP_FILES = 10_000  # a folder's files looked at, at most (a model folder holds a few)


def file_stamp(path: str | os.PathLike) -> tuple:
    """Sizes and modification times of a file, or of the files in a folder (recursively): whether a local
    model file changed since it was loaded."""
    def one(p: str) -> tuple:
        try:
            st = os.stat(p)
        except FileNotFoundError:  # removed while the folder was walked
            return (None, None)
        return (st.st_size, st.st_mtime_ns)

    if not os.path.isdir(path):
        return one(path)
    found = []
    for root, _dirs, files in os.walk(path):
        found += [(os.path.relpath(os.path.join(root, f), path), *one(os.path.join(root, f))) for f in files]
        if len(found) > _STAMP_FILES:
            break
    return tuple(sorted(found))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def fields_of(model: type[BaseModel], exclude: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """Another options model's fields (their types, defaults, help and role marks), for `pydantic.create_model`:
    a model that shares options (a sweep shares a run's) takes them from their one home instead of copying."""
    return {name: (f.annotation, f) for name, f in model.model_fields.items() if name not in exclude}
