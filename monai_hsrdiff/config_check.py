"""Start-up checks of a ``python -m monai.bundle run ...`` command's config: its keys and its values.

MONAI silently adds an unknown key (a misspelt ``--num_epoch 5`` would train for the default
500 epochs) and passes ``--resume false`` on as the string ``"false"``, which ``if @resume``
reads as true. MONAI hands a config expression only resolved values, not its ``ConfigParser``,
so the command's config is rebuilt from the command's own arguments: **fire** (the parser
``python -m monai.bundle`` itself uses) parses ``sys.argv`` against the signature of
``monai.bundle.scripts.run``, and the config is merged as ``ConfigWorkflow.__init__`` merges it
(``ConfigParser().read_config(files)``, then ``update(overrides)``), args_file included. Every
id of that merged config is checked against the bundle's definition files, and every value an
override sets against the type of the key's default. (The one-line errors: :mod:`monai_hsrdiff.error_hook`.)

Example::

    cfg = command_config()  # None unless this process is `python -m monai.bundle run ...`
    cfg["num_epochs"] if cfg is not None else None  # the value this run uses (unresolved)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import pydoc
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_hsrdiff.errors import InferenceInputError, fail

__all__ = [
    "RESERVED",
    "BundleCommand",
    "bundle_command",
    "bundle_config_files",
    "check_command",
    "check_config_keys",
    "command_config",
    "definition_files",
    "flatten",
    "load_json",
]

SEP = "#"
#: files of a bundle folder that do not define keys (they override those of the others)
NOT_DEFINITIONS = ("metadata.json", "demo.json")
#: MONAI's reserved keys inside a component dict
RESERVED = {"_target_", "_disabled_", "_requires_", "_desc_", "_mode_"}
# functions that pass their **kwargs on to a class: check override keys against that class
_FORWARDS = {"monai_hsrdiff.networks.get_preset": "monai_hsrdiff.networks.HSRDiff"}
#: keys naming a sampling precision: read only when the evaluator is built, so checked here
_PRECISION_KEYS = ("val_precision", "eval_precision", "precision")
_CLI = "the command line"


@dataclass
class BundleCommand:
    """A ``monai.bundle`` command's config, rebuilt from its arguments (:func:`bundle_command`).

    Attributes:
        parser: the merged config, as ``ConfigWorkflow`` builds it (not yet resolved).
        config_files: ``--config_file`` in order.
        sources: where the overrides come from -> what they set, in MONAI's precedence (first
            wins): ``"the command line"``, the args_file, the override config files (last first).
        tracking: the ``--tracking`` value (None: off).
    """

    parser: Any
    config_files: list[str]
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    tracking: Any = None


def _is_bundle_cli() -> bool:
    return Path(sys.argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py")


def _fire_arguments(argv: list[str]) -> tuple[str, dict[str, Any]] | None:
    """(command, its arguments by name, ``**override`` spread) as fire parses ``argv`` for
    ``monai.bundle run`` / ``run_workflow``; None for another command."""
    import fire
    from monai.bundle.scripts import run, run_workflow

    target = {"run": run, "run_workflow": run_workflow}.get(argv[0] if argv else "")
    if target is None:
        return None
    sig = inspect.signature(target)
    got: dict[str, Any] = {}

    def capture(*args: Any, **kwargs: Any) -> None:  # returns None: fire prints nothing
        got.update(sig.bind(*args, **kwargs).arguments)

    capture.__signature__ = sig  # type: ignore[attr-defined]  # fire parses against run's own signature
    # fire's own flags (after "--": --interactive, --trace ...) were MONAI's run's business, not ours
    args = list(argv[: argv.index("--")] if "--" in argv else argv)
    fire.Fire({argv[0]: capture}, command=args, name="monai.bundle")
    for p in sig.parameters.values():
        if p.kind == p.VAR_KEYWORD:
            got.update(got.pop(p.name, {}))
    return argv[0], got


def _file_list(config_file: Any) -> list[str]:
    """``--config_file`` as a list: a path, a list of paths, or "a,b" (as MONAI's ``load_config_files``)."""
    if isinstance(config_file, (list, tuple)):
        return [str(f) for f in config_file]
    text = str(config_file)
    if not Path(text).is_file() and "," in text:
        return text.split(",")
    return [text]


def load_json(path: Path) -> dict:
    """A config file's JSON object, or stop (``errors.fail``) naming the file and what is wrong."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise fail(f"config file {path} cannot be read as JSON: {e}") from e
    if not isinstance(doc, dict):
        raise fail(f"config file {path} must hold a JSON object (key: value pairs), got {type(doc).__name__}")
    return doc


def _load(path: str | Path) -> dict:
    if Path(path).suffix == ".json":
        return load_json(Path(path))
    from monai.bundle import ConfigParser

    return dict(ConfigParser.load_config_file(str(path)))


def bundle_command(argv: list[str] | None = None, definitions: list[Path] | None = None) -> BundleCommand | None:
    """The config of this ``monai.bundle`` command, rebuilt from its arguments.

    Args:
        argv: the arguments after the program name; default ``sys.argv[1:]`` when this process
            is the ``monai.bundle`` command line, else the result is None.
        definitions: config files whose keys are definitions, not overrides (their ids are not
            listed in ``sources``).

    Returns:
        None when not run by ``monai.bundle run``/``run_workflow`` or without ``--config_file``.
    """
    if argv is None:
        if not _is_bundle_cli():
            return None
        argv = sys.argv[1:]
    parsed = _fire_arguments(argv)
    if parsed is None:
        return None
    from monai.bundle import ConfigParser, ConfigWorkflow, update_kwargs
    from monai.bundle.scripts import run, run_workflow

    _, args = parsed
    cli = dict(args)
    args_file = cli.pop("args_file", None)
    merged = update_kwargs(args=args_file, **cli)  # as create_workflow: the command line beats the args_file
    # the arguments of the run command and of the workflow it builds are not config keys
    not_keys = {n for fn in (ConfigWorkflow.__init__, run, run_workflow) for n in inspect.signature(fn).parameters}
    not_keys -= {"self", "override", "kwargs"}
    config_file = merged.get("config_file")
    if config_file is None:
        return None
    files = _file_list(config_file)
    own = {Path(d).resolve() for d in definitions or ()}
    sources: dict[str, dict[str, Any]] = {_CLI: {k: v for k, v in cli.items() if k not in not_keys}}
    if args_file:
        sources[str(args_file)] = {k: v for k, v in _load(args_file).items() if k not in not_keys and k not in cli}
    contents = [(f, _load(f)) for f in files]  # a file that is not JSON: one message naming it
    for f, doc in reversed(contents):
        if Path(f).resolve() not in own:
            sources[f] = doc
    parser = ConfigParser()
    parser.read_config(f=files)
    meta = merged.get("meta_file") or str(Path(files[0]).parent / "metadata.json")
    if all(Path(m).is_file() for m in _file_list(meta)):
        parser.read_meta(f=_file_list(meta))
    parser.update(pairs={k: v for k, v in merged.items() if k not in not_keys})
    return BundleCommand(parser, files, sources, merged.get("tracking"))


def command_config_files(argv: list[str]) -> list[str]:
    """``--config_file`` of a ``monai.bundle run`` argument list, in order, reading no file
    ([] for another command, or when only an ``--args_file`` names them)."""
    parsed = _fire_arguments(argv)
    config_file = parsed[1].get("config_file") if parsed is not None else None
    return [] if config_file is None else _file_list(config_file)


def command_config() -> Any:
    """The config (a ``monai.bundle.ConfigParser``) of this ``monai.bundle`` command, rebuilt from its
    arguments as ``ConfigWorkflow`` builds it; None when the process is not ``python -m monai.bundle run``."""
    command = bundle_command()
    return None if command is None else command.parser


def definition_files(bundle_dir: str | Path) -> list[Path]:
    """The files of a bundle folder whose ids are its keys: every ``*.json`` but ``metadata.json``, ``demo.json``."""
    return sorted(p for p in Path(bundle_dir).glob("*.json") if p.name not in NOT_DEFINITIONS)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every config id (``a#b#0#c``) -> its value; a top-level key written as ``a#b`` is that id."""
    out: dict[str, Any] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for k, v in items:
        cid = f"{prefix}{SEP}{k}" if prefix else str(k)
        out[cid] = v
        if isinstance(v, (dict, list)):
            out.update(flatten(v, cid))
    return out


def _callable_params(target: Any) -> set[str] | None:
    """Keyword names ``target`` accepts, or None when it takes any (``**kwargs`` we cannot follow)."""
    if not isinstance(target, str) or target.startswith("$"):
        return None
    obj = pydoc.locate(target) if "." in target else None
    if obj is None and "." not in target:
        from monai.bundle.config_item import ComponentLocator

        mods = ComponentLocator().get_component_module_name(target)
        mod = mods[0] if isinstance(mods, list) and mods else mods
        obj = getattr(importlib.import_module(mod), target, None) if isinstance(mod, str) else None
    if obj is None:
        return None
    names: set[str] = set()
    # a class with **kwargs passes them to its base classes: follow the MRO until one takes no **kwargs
    chain = [c.__init__ for c in inspect.getmro(obj) if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
    if not inspect.isclass(obj) and target in _FORWARDS:
        chain.append(pydoc.locate(_FORWARDS[target]).__init__)
    for fn in chain:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None


def _check_key(key: str, known: dict[str, Any], merged: dict[str, Any]) -> str | None:
    """None when ``key`` is a valid id, else the reason (with a "did you mean").

    ``known``: the ids of the definition files; ``merged``: those of the merged config (where
    an override may have replaced a parent, e.g. a component with another ``_target_``).
    """
    if key in known or key.startswith("_meta_"):
        return None
    parent, _, leaf = key.rpartition(SEP)
    pv = merged.get(parent, known.get(parent)) if parent else None
    if isinstance(pv, list):
        return None  # an element of a list value
    if isinstance(pv, dict):
        if "_target_" in pv:
            if leaf in RESERVED:
                return None
            params = _callable_params(pv["_target_"])
            if params is None or leaf in params:
                return None
            close = difflib.get_close_matches(leaf, sorted(params), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(f'{parent}{SEP}{c}') for c in close)}?" if close else ""
            return f"{leaf!r} is not an argument of {pv['_target_']} (config item {parent!r}){hint}"
        if pv and all(isinstance(v, dict) and "_target_" in v for v in pv.values()):
            return None  # a named collection of components (e.g. additional_metrics): adding one is fine
        if parent not in known or known[parent] == {}:
            return None  # inside a new value that was accepted, or a free-form dict (default {})
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
    if not close and SEP not in key:  # a misspelt top-level key: compare with the top-level keys only
        close = difflib.get_close_matches(key, sorted(k for k in known if SEP not in k), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{key!r} is not a key of this bundle{hint}"


def check_config_keys(
    overrides: dict[str, str],
    definition_files: list[str | Path],
    allowed: tuple[str, ...] = (),
    merged: dict[str, Any] | None = None,
) -> None:
    """Stop (``errors.fail``) with a message when an id names a key the bundle does not define.

    A key is valid when it is a config id of a definition file, an argument of the ``_target_``
    of its parent component, an element of a list, or a new entry of a named collection of
    components (e.g. ``validate#evaluator#additional_metrics#val_ged32``). An id inside one
    that is refused is not listed again.

    Args:
        overrides: config id -> where it came from (``"the command line"``, a file name).
        definition_files: the bundle's own config files, whose ids are the valid keys.
        allowed: further keys to accept (e.g. MONAI's MLflow tracking settings).
        merged: the merged config's ids -> values (:func:`_flatten`), for the parent components;
            default: those of the definition files.

    Example::

        check_config_keys({"num_epoch": "the command line"}, ["bundles/lidc/train.json"])
        # -> ERROR: unknown config key(s): 'num_epoch' ... did you mean 'num_epochs'?
    """
    known: dict[str, Any] = {}
    for f in definition_files:
        known.update(flatten(load_json(Path(f))))
    problems, refused = [], []
    for key, origin in overrides.items():
        if key in allowed or any(key.startswith(r + SEP) for r in refused):
            continue
        why = _check_key(key, known, known if merged is None else merged)
        if why:
            refused.append(key)
            problems.append(f"  {why} (from {origin})")
    if problems:
        raise fail(
            "unknown config key(s):\n" + "\n".join(problems) + "\n"
            "  The keys a run accepts are those of the bundle's own config files "
            f"({', '.join(sorted({Path(f).name for f in definition_files}))}); see docs/workflows.md."
        )


def _is_expression(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("$", "@", "%"))


def _value_problem(key: str, value: Any, default: Any, origin: str) -> str | None:
    """Why an override's (unresolved) value cannot stand for the key's default, or None."""
    from monai_hsrdiff.diffusion.pipeline import PRECISIONS

    if _is_expression(value) or value is None:
        return None
    said = f"--{key} {value}" if origin == _CLI else f"{key} = {json.dumps(value)} (from {origin})"
    if isinstance(default, bool) and not isinstance(value, bool):
        how = "True or False (capitalised)" if origin == _CLI else "true or false, without quotes"
        if origin == _CLI and isinstance(value, str):  # fire passes "false" on as a string
            why = f"The command line passes {value!r} on as a string, which would count as true."
            return f"{said}: {key!r} is a boolean; write {how}. {why}"
        return f"{said}: {key!r} is a boolean; write {how} ({value!r} is not a boolean)."
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (int, float)) and not isinstance(default, bool) and not number:
        return f"{said}: {key!r} is a number (default {default!r}); {value!r} is not a number."
    if key in _PRECISION_KEYS and value not in PRECISIONS:
        return f"{said}: {key!r} must be one of {sorted(PRECISIONS)} (default {default!r})."
    return None


def check_command(task: str, argv: list[str] | None = None) -> BundleCommand | None:
    """Check the config of this ``monai.bundle`` command against ``bundles/<task>``'s definition files.

    Every id of the merged config must be a key of the definition files (:func:`check_config_keys`);
    every value an override sets must fit the type of the key's default (a boolean, a number, a
    precision name). Nothing is checked (None returned) when the process is not the ``monai.bundle``
    command line: a workflow built from Python passes its overrides explicitly.

    Example::

        check_command("lidc", ["run", "training", "--config_file", "bundles/lidc/train.json", "--resume", "false"])
        # ERROR: --resume false: 'resume' is a boolean; write True or False (capitalised). ...
    """
    from monai_hsrdiff.paths import bundle_root

    definitions = definition_files(bundle_root(task))
    command = bundle_command(argv, definitions)
    if command is None:
        return None
    set_by = {}  # id -> the first source that sets it (MONAI's precedence)
    for origin, content in command.sources.items():
        for cid in flatten(content):
            set_by.setdefault(cid, origin)
    merged = flatten(command.parser.get())
    known: dict[str, Any] = {}
    for f in definitions:
        known.update(flatten(load_json(f)))
    allowed: tuple[str, ...] = ()
    if command.tracking:
        from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

        allowed = tuple(DEFAULT_MLFLOW_SETTINGS["configs"])
    unknown = {cid: set_by.get(cid, "a config file") for cid in merged if cid not in known}
    check_config_keys(unknown, definitions, allowed=allowed, merged=merged)
    for cid, origin in set_by.items():
        why = _value_problem(cid, merged.get(cid), known[cid], origin) if cid in known and cid in merged else None
        if why:
            raise fail(why)
    return command


def bundle_config_files(bundle: Path, configs: Sequence[str | os.PathLike]) -> list[Path]:
    """train.json, inference.json and the ``--config`` overrides; an override may only set keys the bundle defines
    (MONAI would silently add a misspelt key and the model would not be the one trained)."""
    files = [bundle / "train.json", bundle / "inference.json", *[Path(c) for c in configs]]
    for f in files:
        if not f.is_file():
            raise InferenceInputError(f"config file {f} does not exist (--bundle {bundle}, --config {list(configs)})")
    overrides: dict[str, str] = {}
    for c in configs:
        overrides.update({k: str(c) for k in load_json(Path(c)) if k not in overrides})
    check_config_keys(overrides, definition_files(bundle))
    return files
