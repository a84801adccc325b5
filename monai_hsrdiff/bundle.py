"""Helpers the bundle configs call: where a bundle's data and run directory are, and the
start-up checks that stop a run at once with a message instead of a traceback.

A bundle config cannot refer to its own file (``__file__`` is undefined in config
expressions), so paths are resolved from this package: with the repository checkout
installed in editable mode (what the README's commands do), ``repo_root()`` is the checkout,
and every run of ``bundles/<task>/*.json`` writes to ``<repo>/runs/<task>/`` whatever the
working directory. ``HSRDIFF_RUN_ROOT`` and ``HSRDIFF_DATA_ROOT`` move them elsewhere; the
config keys ``run_dir`` and ``dataset_dir`` override them per run.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import json
import os
import pydoc
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "BundleError",
    "bundle_root",
    "check_config_keys",
    "check_command_line",
    "default_dataset_dir",
    "default_run_dir",
    "fail",
    "install_error_hook",
    "repo_root",
    "require_datalist",
    "require_writable",
]

from monai_hsrdiff.errors import BundleError, fail
from monai_hsrdiff.paths import TASKS, bundle_root, check_task, default_dataset_dir, default_run_dir, repo_root

_check_task = check_task  # the old private name


_PREPARE = {
    "lidc": "python -m preprocessing.lidc --dicom-root /path/to/LIDC-IDRI --out {d}",
    "ms_lesion": "python -m preprocessing.ms_lesion --root /path/to/ISBI2015 --out {d}",
}


def require_datalist(dataset_dir: str, task: str, splits: list[str] | tuple[str, ...] = ("training",)) -> str:
    """Return ``<dataset_dir>/datalist.json`` or stop with the commands that create it.

    Also checks that each split in ``splits`` exists and is not empty, and that every item
    file it lists is there, before any long work starts.
    """
    path = Path(dataset_dir) / "datalist.json"
    if not path.is_file():
        raise fail(
            f"no prepared {task} data: {path} does not exist.\n"
            f"  Prepare the real data set:  {_PREPARE[_check_task(task)].format(d=dataset_dir)}\n"
            f"  or build the synthetic demo: python -m preprocessing.demo --task {task} --out {dataset_dir}\n"
            f"  (or point the run at prepared data with --dataset_dir DIR)"
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise fail(f"{path} is not a readable datalist JSON: {e}") from e
    for split in splits:
        entries = doc.get(split)
        if not entries:
            raise fail(f"{path}: split {split!r} is missing or empty; re-run preprocessing with other --split-ratios")
        bad = next((i for i, e in enumerate(entries) if not isinstance(e, dict) or not isinstance(e.get("item"), str)), None)
        if bad is not None:
            raise fail(f"{path}: split {split!r}, entry {bad}: expected {{\"item\": \"<item file>\"}}, got {entries[bad]!r}")
        missing = [e["item"] for e in entries if not (path.parent / e["item"]).is_file()]
        if missing:
            raise fail(f"{path}: {len(missing)} item file(s) of split {split!r} are missing, e.g. {missing[0]}")
    return str(path)


def require_writable(folder: str | Path, key: str = "run_dir") -> None:
    """Stop unless ``folder`` can be created/written (``monai_hsrdiff.utils.unwritable_reason``).
    Creates nothing, so a refused run leaves the disk as it was."""
    from monai_hsrdiff.utils import unwritable_reason

    reason = unwritable_reason(folder)
    if reason:
        raise fail(
            f"cannot write the {key} {Path(folder).absolute()}: {reason}. "
            f"Choose another folder with --{key} DIR (or move HSRDIFF_RUN_ROOT)."
        )


def announce(datalist: str, run_dir: str, network=None, datasets: dict | None = None) -> None:
    """Print what this run uses: data set (and whether its images are SYNTHETIC), run folder, model size.

    Also checks that the run folder can be written (:func:`require_writable`), before any work.
    ``datasets`` (split -> the :func:`make_dataset` it uses): building them checked every item.
    """
    require_writable(run_dir)
    doc = json.loads(Path(datalist).read_text())
    print(f"[hsrdiff] data: {doc.get('name', '?')} from {datalist}", flush=True)
    if doc.get("synthetic"):
        print(
            "[hsrdiff] NOTE: this data set is SYNTHETIC (demo images generated around real reader contours); "
            "its metrics say nothing about real CT/MRI.",
            flush=True,
        )
    for split in ("training", "validation", "test"):
        used = f" ({len(datasets[split])} used, checked)" if split in (datasets or {}) else ""
        print(f"[hsrdiff]   {split}: {len(doc.get(split, []))} items{used}", flush=True)
    if network is not None:
        n = sum(p.numel() for p in network.parameters())
        print(f"[hsrdiff] network: {type(network).__name__}, {n / 1e6:.2f}M parameters", flush=True)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        print(
            f"[hsrdiff] distributed: {dist.get_world_size()} processes ({dist.get_backend()}); "
            "this process (rank 0) writes checkpoints and logs",
            flush=True,
        )
    print(f"[hsrdiff] run directory: {run_dir}", flush=True)


def make_dataset(
    datalist: str,
    split: str,
    transforms,
    in_channels: int,
    image_size: int | None = None,
    max_items: int | None = None,
    cache: bool = False,
):
    """The split's MONAI dataset, after checking EVERY item it uses (``data.check_items``: format,
    channels == ``in_channels``, size == ``image_size``; headers only), before any long work starts."""
    from monai_hsrdiff.data import check_items, get_dataset, load_datalist

    try:
        entries = load_datalist(datalist, split)
        if max_items is not None:
            entries = entries[: int(max_items)]
        check_items(entries, split, in_channels, image_size, datalist)
    except (FileNotFoundError, KeyError, ValueError) as e:  # DatalistError is a ValueError
        raise fail(str(e)) from e
    return get_dataset(entries, transforms=transforms, cache=cache)


def report_metrics(evaluator, eval_dir: str) -> dict:
    """Print the evaluator's metrics and write them to ``<eval_dir>/metrics.json`` (atomically)."""
    from monai_hsrdiff.utils import atomic_write_text

    metrics = {k: float(v) for k, v in evaluator.state.metrics.items()}
    print("[hsrdiff] evaluation metrics:", flush=True)
    for k, v in sorted(metrics.items()):
        print(f"[hsrdiff]   {k} = {v:.4f}", flush=True)
    out = Path(eval_dir) / "metrics.json"
    atomic_write_text(out, json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    print(f"[hsrdiff] metrics written to {out}", flush=True)
    return metrics


# ---------------------------------------------------------------------------------------------
# Start-up checks of the command line: unknown keys, and short messages instead of tracebacks
# ---------------------------------------------------------------------------------------------

SEP = "#"
# files in a bundle folder that define keys (all others given in --config_file override them)
_NOT_DEFINITIONS = ("metadata.json", "demo.json")
# MONAI's reserved keys inside a component dict
_RESERVED = {"_target_", "_disabled_", "_requires_", "_desc_", "_mode_"}
# functions that pass their **kwargs on to a class: check override keys against that class
_FORWARDS = {"monai_hsrdiff.networks.get_preset": "monai_hsrdiff.networks.HSRDiff"}


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every config id (``a#b#0#c``) -> its value; a top-level key written as ``a#b`` is that id."""
    out: dict[str, Any] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for k, v in items:
        cid = f"{prefix}{SEP}{k}" if prefix else str(k)
        out[cid] = v
        if isinstance(v, (dict, list)):
            out.update(_flatten(v, cid))
    return out


def _load_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise fail(f"config file {path} cannot be read as JSON: {e}") from e
    if not isinstance(doc, dict):
        raise fail(f"config file {path} must hold a JSON object (key: value pairs), got {type(doc).__name__}")
    return doc


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


def _check_key(key: str, known: dict[str, Any]) -> str | None:
    """None when ``key`` is a valid override id, else the reason (with a "did you mean")."""
    if key in known or key.startswith("_meta_"):
        return None
    parent, _, leaf = key.rpartition(SEP)
    if parent in known and isinstance(known[parent], dict):
        pv = known[parent]
        if "_target_" in pv:
            if leaf in _RESERVED:
                return None
            params = _callable_params(pv["_target_"])
            if params is None or leaf in params:
                return None
            close = difflib.get_close_matches(leaf, sorted(params), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(f'{parent}{SEP}{c}') for c in close)}?" if close else ""
            return f"{leaf!r} is not an argument of {pv['_target_']} (config item {parent!r}){hint}"
        if pv and all(isinstance(v, dict) and "_target_" in v for v in pv.values()):
            return None  # a named collection of components (e.g. additional_metrics): adding one is fine
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
    if not close and SEP not in key:  # a misspelt top-level key: compare with the top-level keys only
        close = difflib.get_close_matches(key, sorted(k for k in known if SEP not in k), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{key!r} is not a key of this bundle{hint}"


def check_config_keys(
    overrides: dict[str, str],
    definition_files: list[str | Path],
    allowed: tuple[str, ...] = (),
) -> None:
    """Stop with a message when an override names a key the bundle does not define.

    MONAI silently adds unknown keys, so a misspelt ``--num_epoch 5`` would otherwise train for
    the default 500 epochs. A key is valid when it is a config id of a definition file, an
    argument of the ``_target_`` of its parent component, or a new entry of a named collection
    of components (e.g. ``validate#evaluator#additional_metrics#val_ged32``).

    Args:
        overrides: config id -> where it came from (``"the command line"``, a file name).
        definition_files: the bundle's own config files, whose ids are the valid keys.
        allowed: further keys to accept (e.g. MONAI's MLflow tracking settings).

    Example::

        check_config_keys({"num_epoch": "the command line"}, ["bundles/lidc/train.json"])
        # -> ERROR: unknown config key(s): 'num_epoch' ... did you mean 'num_epochs'?
    """
    known: dict[str, Any] = {}
    for f in definition_files:
        known.update(_flatten(_load_json(Path(f))))
    problems = []
    for key, origin in overrides.items():
        if key in allowed:
            continue
        why = _check_key(key, known)
        if why:
            problems.append(f"  {why} (from {origin})")
    if problems:
        raise fail(
            "unknown config key(s):\n" + "\n".join(problems) + "\n"
            "  The keys a run accepts are those of the bundle's own config files "
            f"({', '.join(sorted({Path(f).name for f in definition_files}))}); see docs/workflows.md."
        )


def _parse_cli(argv: list[str]) -> tuple[list[str], dict[str, str], dict[str, str], dict[str, str]]:
    """(config files, override key -> "the command line", run() arguments, override key -> raw value)
    of a ``monai.bundle run`` argv."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle.scripts import run as bundle_run

    # arguments of `run` and of the workflow it builds (e.g. --workflow_type) are not config keys
    run_args = set(inspect.signature(bundle_run).parameters) | set(inspect.signature(ConfigWorkflow.__init__).parameters)
    run_args -= {"self", "override"}
    run_args.add("workflow_name")
    params: dict[str, str] = {}
    overrides: dict[str, str] = {}
    values: dict[str, str] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":  # fire's own flags follow
            break
        if tok.startswith("--") and len(tok) > 2:
            key, eq, value = tok[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            key = key.replace("-", "_")  # fire reads --num-epochs as num_epochs
            if key in run_args:
                params[key] = value
            else:
                overrides[key] = "the command line"
                values[key] = value
        i += 1
    files = params.get("config_file", "")
    try:
        parsed = ast.literal_eval(files) if files.strip().startswith(("[", "(")) else files
    except (ValueError, SyntaxError) as e:
        raise fail(f"--config_file {files!r} is neither a path nor a list of paths: {e}") from e
    config_files = [str(f) for f in (parsed if isinstance(parsed, (list, tuple)) else [parsed] if parsed else [])]
    return config_files, overrides, params, values


def _is_number_literal(value: str) -> bool:
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return False
    return parsed is None or (isinstance(parsed, (int, float)) and not isinstance(parsed, bool))


#: Keys naming a sampling precision, checked at start-up: they are read only when the evaluator
#: is built, after the run folder and the tracking store were created.
_PRECISION_KEYS = ("val_precision", "eval_precision", "precision")


def _check_bool_values(values: dict[str, str], definition_files: list[Path]) -> None:
    """Boolean keys must get ``True``/``False``: fire passes ``false`` on as the STRING "false",
    which a config ``if @resume`` would read as true. Numeric keys must get a number: fire passes
    ``--num_epochs x`` on as the string "x", which fails much later with a message that names
    neither the key nor the value (and after the run folder was created)."""
    from monai_hsrdiff.diffusion.pipeline import PRECISIONS

    known: dict[str, Any] = {}
    for f in definition_files:
        known.update(_flatten(_load_json(f)))
    for key, value in values.items():
        default = known.get(key)
        if isinstance(default, bool):
            if value not in ("", "True", "False"):
                raise fail(
                    f"--{key} {value}: {key!r} is a boolean; write True or False (capitalised). "
                    f"The command line passes {value!r} on as a string, which would count as true."
                )
        elif isinstance(default, (int, float)) and not value.startswith(("$", "@")) and not _is_number_literal(value):
            raise fail(f"--{key} {value}: {key!r} is a number (default {default!r}); {value!r} is not a number.")
        elif key in _PRECISION_KEYS and not value.startswith(("$", "@")) and value.strip("'\"") not in PRECISIONS:
            raise fail(f"--{key} {value}: {key!r} must be one of {sorted(PRECISIONS)} (default {default!r}).")


def check_command_line(task: str, argv: list[str] | None = None) -> None:
    """Start-up check of a ``python -m monai.bundle run ...`` command; the first ``initialize`` step.

    Installs :func:`install_error_hook` (short messages instead of tracebacks), then checks
    every key set on the command line and in override files (e.g. ``demo.json``) against the
    keys defined by the bundle's own config files (all ``bundles/<task>/*.json`` except
    ``metadata.json`` and ``demo.json``), with a "did you mean" for misspellings.

    Args:
        task: the bundle's task (``lidc`` or ``ms_lesion``).
        argv: the command line after the program name; default ``sys.argv[1:]`` when this
            process is the ``monai.bundle`` command line, else the key check is skipped
            (a workflow built from Python passes its overrides explicitly).
    """
    install_error_hook()
    if argv is None:
        if Path(sys.argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py"):
            return
        argv = sys.argv[1:]
    config_files, overrides, params, values = _parse_cli(argv)
    bundle_dir = Path(bundle_root(task))
    definitions = sorted(p for p in bundle_dir.glob("*.json") if p.name not in _NOT_DEFINITIONS)
    for f in config_files:
        path = Path(f)
        if path.resolve() in {d.resolve() for d in definitions}:
            continue
        if path.suffix == ".json" and path.is_file():
            overrides.update({k: str(path) for k in _load_json(path) if k not in overrides})
    if params.get("args_file"):
        from monai.bundle import ConfigParser

        args = ConfigParser.load_config_file(params["args_file"])
        for k in args:
            if k not in ("run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking"):
                overrides.setdefault(k, params["args_file"])
    allowed: tuple[str, ...] = ()
    if params.get("tracking"):
        from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

        allowed = tuple(DEFAULT_MLFLOW_SETTINGS["configs"])
    check_config_keys(overrides, definitions, allowed=allowed)
    _check_bool_values(values, definitions)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _is_config_wrapper(exc: BaseException) -> bool:
    return type(exc) is RuntimeError and str(exc).startswith(("Failed to instantiate", "Failed to evaluate"))


def _config_id(tb) -> str | None:
    """The innermost config item MONAI's resolver was working on when the error was raised."""
    found = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_resolve_one_item" and isinstance(frame.f_locals.get("id"), str):
            found = frame.f_locals["id"]
        tb = tb.tb_next
    return found.replace("::", SEP) if found else None  # MONAI's resolver keys ids with "::" internally


def _excepthook(exc_type, exc, tb) -> None:
    chain = _chain(exc)
    if os.environ.get("HSRDIFF_TRACEBACK") or not any(_is_config_wrapper(e) for e in chain):
        sys.__excepthook__(exc_type, exc, tb)
        return
    from monai_hsrdiff.engines.trainer import own_error

    # our own error's message names the file or key (an ItemFormatError's, not that of the BadZipFile it wraps)
    own = own_error(exc)
    root = own or next((e for e in reversed(chain) if not _is_config_wrapper(e)), exc)
    if isinstance(root, BundleError):  # already printed by fail()
        return
    if own is not None:
        msg = str(own)
    else:
        where = _config_id(tb)
        msg = f"{type(root).__name__}: {root}" + (f"\n  (while building config item {where!r})" if where else "")
    print(f"\nERROR: {msg}\n  Set HSRDIFF_TRACEBACK=1 to see the full traceback.\n", file=sys.stderr, flush=True)


def install_error_hook() -> None:
    """Print errors raised inside MONAI's config resolution as one short message, not a traceback.

    MONAI wraps every error of a config item in ``RuntimeError("Failed to instantiate ...")``
    and the command line prints the whole chain (often 100+ lines); the hook prints the
    original error's type and message and the config item being built. Other uncaught errors
    keep Python's normal traceback, and ``HSRDIFF_TRACEBACK=1`` restores it for all.
    """
    sys.excepthook = _excepthook
