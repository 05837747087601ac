"""Options shared by the commands: their flags, help and defaults come from the library's config models,
and library messages that name parameters are shown with the flags."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.markup import escape

from neuropredictor.cli.app import err_console
from neuropredictor.config import ExtractConfig
from neuropredictor.encode.options import EncodeOptions
from neuropredictor.redact import redact_text

Weights = Annotated[Optional[Path], typer.Option("--weights", help=ExtractConfig.model_fields["weights"].description)]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def field_help(name: str) -> str:
    return ExtractConfig.model_fields[name].description or ""


def option(name: str, *flags: str, help: str | None = None) -> Any:
    """The option of ExtractConfig field `name`: its flag is the field's name, its help the field's (plain
    text: SOURCE:NAME[@TAG] is not markup)."""
    return typer.Option(*(flags or ("--" + name.replace("_", "-"),)), help=escape(help or field_help(name)))


# Library messages name parameters (overwrite=True, `out`); on the command line they are flags, named by
# the same rule as the options below (`retry_delay_seconds` and `keys_file` are the exceptions).
_FLAG_ALIASES = {"pretrained=False": "--no-pretrained", "weights=PATH": "--weights PATH", "keys=": "--keys",
                 "retry_delay_seconds": "--retry-delay", "keys_file": "--keys"}


def as_flags(message: str) -> str:
    """message with the parameters it names written as flags (`overwrite=True` -> --overwrite)."""
    for words, flag in _FLAG_ALIASES.items():
        message = message.replace(words, flag)
    for name in {*ExtractConfig.model_fields, *EncodeOptions.model_fields}:
        flag = "--" + name.replace("_", "-")
        message = re.sub(rf"\b{name}=True\b", flag, message)
        message = re.sub(rf"`{name}`|\b{name}=(?=[\s,.;)]|$)", flag, message)
    return message


def fail(exc: Exception) -> NoReturn:
    from pydantic import ValidationError

    text = redact_text(invalid_values(exc) if isinstance(exc, ValidationError) else str(exc))
    err_console.print(f"[bold red]error:[/] {escape(as_flags(text))}", highlight=False)
    raise typer.Exit(2)


def invalid_values(exc: Any) -> str:
    """A pydantic ValidationError as one line: each bad value by its option's name, with what it should be
    (not pydantic's block with Python field names and a URL)."""
    from neuropredictor.sweep.config import EncodeSettings, SweepConfig, SweepModel

    known = {*ExtractConfig.model_fields, *EncodeOptions.model_fields, *SweepConfig.model_fields,
             *SweepModel.model_fields}
    parts: list[str] = []
    for err in exc.errors(include_url=False):
        # a union's members each report an error: the plain string's is noise beside the entry's own
        if err["type"] == "string_type" and err["loc"][-1:] == ("str",):
            continue
        loc = [str(p) for p in err["loc"] if p not in ("str", "SweepModel")]
        name = loc[-1] if loc else ""
        if err["type"] == "extra_forbidden":
            inner = name.removeprefix("encode_")
            if inner != name and inner in EncodeSettings.model_fields:  # the command line's --encode-X, in a file
                parts.append(f"unknown option {'.'.join(loc)!r}: in a sweep file it is `encode: {{{inner}: ...}}` "
                             f"(--{name.replace('_', '-')} on the command line)")
                continue
            close = difflib.get_close_matches(name, known, n=1)
            parts.append(f"unknown option {'.'.join(loc)!r}" + (f" (did you mean `{close[0]}`?)" if close else ""))
            continue
        where = f"`{name}`" if len(loc) == 1 else ".".join(loc)
        if err["type"] == "value_error":  # our own validators' messages say what was given, and the fix
            parts.append(f"{where}: {err['ctx']['error']}")
            continue
        got = err.get("input")
        parts.append(f"{where}: {err['msg']}" + ("" if isinstance(got, (dict, list)) else f" (got {got!r})"))
    return "; ".join(dict.fromkeys(parts))


ENC = EncodeOptions.model_fields  # the CLI's encode options take their defaults and help from here


def enc_option(name: str, *flags: str) -> typer.models.OptionInfo:
    return typer.Option(*flags, help=ENC[name].description)


# How a run goes, shared by `extract` and `sweep`; their defaults are RUN_DEFAULTS.<field>.
RUN_DEFAULTS = SimpleNamespace(**{name: f.default for name, f in ExtractConfig.model_fields.items()})
Pretrained = Annotated[bool, option("pretrained", "--pretrained/--no-pretrained",
                                    help="Use the source's pretrained weights (--no-pretrained: random weights, no "
                                    "download).")]
BatchSize = Annotated[int, option("batch_size")]
Precision = Annotated[str, option("precision")]
DType = Annotated[str, option("dtype")]
NumWorkers = Annotated[int | None, option("num_workers")]
Device = Annotated[str, option("device")]
ChannelsLast = Annotated[bool, option("channels_last")]
Decode = Annotated[str, option("decode")]
Compile = Annotated[bool, option("compile")]
Compression = Annotated[str, option("compression")]
Overwrite = Annotated[bool, option("overwrite")]
Verify = Annotated[bool, option("verify")]
Retries = Annotated[int, option("retries")]
RetryDelay = Annotated[float, option("retry_delay_seconds", "--retry-delay")]
UsePrefect = Annotated[bool | None, typer.Option(
    "--prefect/--no-prefect", help="Run as a Prefect flow run (UI, artifacts). Default: when a Prefect server "
    "is configured (PREFECT_API_URL).")]

# How the neural data is read and the layers scored, shared by `encode` and `sweep` (defaults: ENC[name].default).
KeysFile = Annotated[str | None, enc_option("keys_file", "--keys")]
KeyColumn = Annotated[str, enc_option("key_column", "--key-column")]
Split = Annotated[str | None, enc_option("split", "--split")]
Groups = Annotated[str | None, enc_option("groups", "--groups")]
Folds = Annotated[int | None, enc_option("folds", "--folds")]
Alphas = Annotated[str | None, enc_option("alphas", "--alphas")]
TestFraction = Annotated[float, enc_option("test_fraction", "--test-fraction")]
InnerFolds = Annotated[int, enc_option("inner_folds", "--inner-folds")]
Seed = Annotated[int, enc_option("seed", "--seed")]
Permutations = Annotated[int, enc_option("permutations", "--permutations")]
Targets = Annotated[str | None, enc_option("targets", "--targets")]
Roi = Annotated[str | None, enc_option("roi", "--roi")]
Ceiling = Annotated[str | None, enc_option("ceiling", "--ceiling")]
Array = Annotated[str | None, enc_option("array", "--array")]
