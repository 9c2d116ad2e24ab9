"""Command-line flags from a stage's config model, and the config from ``--spec`` + flags.

One source for option names, types, defaults and help: the pydantic fields of the stage's ``StageConfig``.
``add_config_arguments`` turns each field into a flag (``case_set`` → ``--case-set``; default and description
shown in ``--help``); flags left out of the command line are absent from the namespace, so that

    config = Config.model_validate({**spec file, **flags given})

— a spec validates straight into the config (unknown keys refused in one line), the flags given win over it.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from pipeline.errors import ConfigError

#: Namespace attributes that are not config fields
_RUN_ARGS = {"func", "result", "spec", "command"}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), len(args) < len(typing.get_args(annotation))
    return annotation, False


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[BaseModel], *,
                         skip: tuple[str, ...] = (), spec: bool = True,
                         spec_flags: tuple[str, ...] = ("--spec",)) -> None:
    """A flag per field of ``model`` (not those in ``skip``); field ``json_schema_extra`` may give ``flags``
    (other spellings), ``metavar``, ``nargs`` and ``cli_type: "text"`` (the flag takes the text as it is and the
    field's validator parses it, e.g. ``0-144``)."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flags = ["--" + name.replace("_", "-"), *extra.get("flags", ())]
        typ, _ = _unwrap(field.annotation)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        help_text = (field.description or "").replace("%", "%%")
        if not field.is_required() and default is not None and default is not False and default not in ([], (), ""):
            help_text += f" (default {default if not isinstance(default, (list, tuple)) else ' '.join(map(str, default))})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text.strip() or None}
        if field.is_required():  # required by the config, not by argparse: a --spec may give it
            kwargs["help"] = (help_text + " (required)").strip()
        origin = typing.get_origin(typ)
        if typ is bool:
            # off by default: an on-switch only, unless the field keeps its --no- form (a default that changed)
            negatable = default is not False or extra.get("negatable")
            kwargs["action"] = argparse.BooleanOptionalAction if negatable else "store_true"
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(typ))
        elif origin in (list, tuple) and "cli_type" not in extra:
            item = typing.get_args(typ)[0] if typing.get_args(typ) else str
            if typing.get_origin(item) is Literal:
                kwargs["choices"] = list(typing.get_args(item))
            kwargs["type"] = item if item in (int, float) else str
            if "nargs" in extra:  # --formats png pdf
                kwargs.update(nargs=extra["nargs"], action="extend")
            else:  # --agent A --agent B
                kwargs["action"] = "append"
        else:
            kwargs["type"] = str if "cli_type" in extra else (typ if typ in (int, float) else str)
        if "metavar" in extra:
            kwargs["metavar"] = extra["metavar"]
        parser.add_argument(*flags, **kwargs)
    if spec:
        parser.add_argument(*spec_flags, dest="spec", metavar="FILE", help="YAML or JSON file of these options by field name (as "
                            "the Airflow operator passes them); flags given on the command line win")


def read_spec(path: str | Path, option: str = "--spec") -> dict[str, Any]:
    """A YAML or JSON mapping of option names (``-`` accepted for ``_``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{option} {path}: not UTF-8 text (byte {e.start}); expected a YAML or JSON file") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json/yaml parse errors
        raise ConfigError(f"{option} {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                          f"({' '.join(str(e).split())[:200]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{option} {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def validate_config(model: type[BaseModel], values: dict[str, Any], source: str = "") -> Any:
    """``model`` from ``values``; the first validation problem as one line naming the option."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        errors = e.errors()
        # a misspelt key first: it usually explains a "missing" one too
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        where = f"{source}: " if source else ""
        if err["type"] == "extra_forbidden":
            import difflib

            close = difflib.get_close_matches(loc, list(model.model_fields), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(sorted(model.model_fields))}"
            what = getattr(model, "stage", "") or "this command"
            raise ConfigError(f"{where}unknown option '{loc}' for {what} ({hint})") from None
        if err["type"] == "missing":
            raise ConfigError(f"{where}--{loc.replace('_', '-')} is required") from None
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:  # a rule across fields: its message names the options
            raise ConfigError(f"{where}{msg}") from None
        given = err.get("input")
        shown = f" (got {json.dumps(given, default=str)[:80]})" if given is not None and not isinstance(given, dict) else ""
        raise ConfigError(f"{where}--{loc.replace('_', '-')}: {msg}{shown}") from None


def config_from_args(model: type[BaseModel], args: argparse.Namespace, **fixed: Any) -> Any:
    """The config from ``--spec`` (if any) overlaid with the flags given on the command line and ``fixed``."""
    values: dict[str, Any] = read_spec(args.spec) if getattr(args, "spec", None) else {}
    given = {k: v for k, v in vars(args).items() if k in model.model_fields and k not in _RUN_ARGS}
    values.update(given)
    values.update(fixed)
    return validate_config(model, values, source=f"--spec {args.spec}" if getattr(args, "spec", None) else "")
