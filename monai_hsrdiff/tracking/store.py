"""Where a run logs to: the MLflow tracking store, its start-up check, and the UI command.

By default every bundle run logs to a local store inside its run directory, so no server
is needed and the run folder carries its own history:

- backend: ``sqlite:///<run_dir>/mlflow.db`` (MLflow 3 refuses the old file store);
- artifacts: ``<run_dir>/mlartifacts`` (PNGs, config, checkpoints).

Precedence (most specific first): the bundle key ``tracking_uri`` (``--tracking_uri URI`` on
the command line), then the ``MLFLOW_TRACKING_URI`` environment variable, then the local
store. The store is checked before training starts; an unreachable one stops the run with a
message naming the URI, unless ``tracking_fallback_local`` is true, in which case the run
logs to the local store instead and says so.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from monai_hsrdiff.errors import fail

from .runs_view import VIEW_KEY, has_runs_view

__all__ = [
    "TrackingStore",
    "check_tracking_store",
    "local_artifact_root",
    "local_runs_url",
    "local_tracking_uri",
    "mlflow_command",
    "resolve_tracking_store",
    "runs_url",
    "ui_command",
]

DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"

# MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) make one failed call
# to a dead server block for minutes; a training loop logs every iteration. These shorter
# defaults apply only when the user has not set the variables.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


@dataclass(frozen=True)
class TrackingStore:
    """A resolved tracking store.

    Attributes:
        uri: the tracking URI every client of this run uses.
        artifact_location: artifact root for experiments this run creates (None: the
            server decides, e.g. its ``--artifacts-destination``).
        source: where ``uri`` came from: "config", "env", "local" or "fallback".
        is_local: True for the run directory's own SQLite store.
    """

    uri: str
    artifact_location: str | None
    source: str
    is_local: bool


def local_tracking_uri(run_dir: str | os.PathLike) -> str:
    """``sqlite:///<absolute run_dir>/mlflow.db`` (four slashes on POSIX: the path is absolute)."""
    return "sqlite:///" + (Path(run_dir).resolve() / DB_NAME).as_posix()


def local_artifact_root(run_dir: str | os.PathLike) -> str:
    """``<absolute run_dir>/mlartifacts``: where the local store keeps run artifacts."""
    return (Path(run_dir).resolve() / ARTIFACT_DIR).as_posix()


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    """Set (or unset, value None) environment variables for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return (text[:limit] + " ...") if len(text) > limit else text


def _template_db() -> Path:
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "monai_hsrdiff"
    return cache / f"mlflow-{mlflow.__version__}-empty.db"


def _seed_sqlite_store(db: Path) -> None:
    """Create a new local store by copying an empty store of this MLflow version.

    MLflow builds a new SQLite store by running its whole schema migration history (5-15 s on
    a busy CPU), once per run directory. The empty store is made once by MLflow itself, kept
    in ``$XDG_CACHE_HOME/monai_hsrdiff`` (default ``~/.cache``), and copied; on any problem
    MLflow simply creates the store itself.
    """
    import mlflow

    from monai_hsrdiff.utils import atomic_path

    template = _template_db()
    try:
        if not template.is_file():
            with atomic_path(template) as tmp:
                tmp.unlink()
                mlflow.MlflowClient(tracking_uri="sqlite:///" + tmp.as_posix()).search_experiments(max_results=1)
        with atomic_path(db) as tmp:
            shutil.copyfile(template, tmp)
    except Exception:  # the cache is an optimisation only
        return


def check_tracking_store(uri: str, timeout: float = 10.0) -> None:
    """Raise ``ConnectionError`` when the store at ``uri`` cannot be used.

    The check is MLflow's own: a client for ``uri`` lists one experiment. For HTTP stores the
    request is made once (no retries) with ``timeout`` seconds, so a dead server is reported
    in seconds; a local SQLite store is created (with MLflow's schema) when missing.

    Args:
        uri: an MLflow tracking URI (``sqlite:///...``, ``http(s)://...``, ``databricks``, ...).
        timeout: seconds to wait for an HTTP store.

    Raises:
        ConnectionError: with the reason (refused connection, HTTP error, bad database, ...).
    """
    import mlflow

    if uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
        raise ConnectionError(
            "MLflow no longer supports the file store (a plain path or file:// URI); "
            "use sqlite:///<path>/mlflow.db or an http(s):// server URI"
        )
    db = _sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConnectionError(f"cannot create the folder of the SQLite file: {e}") from e
        if not db.exists():
            _seed_sqlite_store(db)
        if db.is_file() and db.stat().st_size > 0:
            with db.open("rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise ConnectionError(f"{db} exists but is not an SQLite database")
    try:
        with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(max(1, timeout)))):
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # MLflow raises MlflowException, requests/sqlalchemy errors, ...
        raise ConnectionError(f"{type(e).__name__}: {_short(e)}") from e


def resolve_tracking_store(
    run_dir: str | os.PathLike,
    tracking_uri: str | None = None,
    fallback_local: bool = False,
    timeout: float = 10.0,
) -> TrackingStore:
    """Pick the tracking store of a run and check it, before any training starts.

    Args:
        run_dir: the bundle's run directory (holds the local store).
        tracking_uri: the bundle key ``tracking_uri``; None or "" defers to
            ``MLFLOW_TRACKING_URI``, then to the local store.
        fallback_local: when the chosen store cannot be reached, log to the local store
            (with a warning) instead of stopping.
        timeout: seconds to wait for an HTTP store.

    Returns:
        The :class:`TrackingStore`. A bundle resolves it once, in its ``tracking_run``
        (:class:`~monai_hsrdiff.tracking.TrackingRun`), which all its handlers share.

    Raises:
        BundleError: (exit code 2, no traceback) the store is unreachable and
            ``fallback_local`` is false, or the local store itself is unusable.

    Example::

        store = resolve_tracking_store("runs/lidc_demo")
        store.uri  # 'sqlite:////.../runs/lidc_demo/mlflow.db'
    """
    env_uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    local_uri = local_tracking_uri(run_dir)
    if tracking_uri:
        uri, source = str(tracking_uri), "config"
    elif env_uri:
        uri, source = env_uri, "env"
    else:
        uri, source = local_uri, "local"
    if uri.startswith(("http://", "https://")):
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
    where = {"config": "the bundle key tracking_uri", "env": "MLFLOW_TRACKING_URI", "local": "the default local store"}[
        source
    ]
    try:
        check_tracking_store(uri, timeout=timeout)
    except ConnectionError as e:
        if source == "local":
            raise fail(f"the local MLflow store {uri} cannot be used: {e}. Check that {Path(run_dir)} is writable.") from e
        if not fallback_local:
            raise fail(
                f"the MLflow tracking store {uri} (from {where}) cannot be reached: {e}.\n"
                f"  Start the server or correct the URI, or\n"
                f"  log to this run's local store instead: --tracking_fallback_local True  ({local_uri}), or\n"
                f"  run without tracking: --tracking_enabled False"
            ) from e
        msg = (
            f"the MLflow tracking store {uri} (from {where}) cannot be reached ({e}); "
            f"tracking_fallback_local is true, so this run logs to the local store {local_uri}"
        )
        print(f"[hsrdiff] WARNING: {msg}", file=sys.stderr, flush=True)
        try:
            check_tracking_store(local_uri, timeout=timeout)
        except ConnectionError as e2:
            raise fail(f"the local MLflow store {local_uri} cannot be used either: {e2}") from e2
        uri, source = local_uri, "fallback"
    db = _sqlite_path(uri)
    artifact_location = Path(db.parent / ARTIFACT_DIR).as_uri() if db is not None else None
    return TrackingStore(uri=uri, artifact_location=artifact_location, source=source, is_local=uri == local_uri)


def mlflow_command() -> list[str]:
    """The argv prefix that runs this environment's MLflow from any shell.

    The ``mlflow`` script next to this Python (``<venv>/bin/mlflow``, by absolute path) so the
    command works in a shell where the virtual environment is not active; when there is no such
    script, ``<this python> -m mlflow``.

    Example::

        subprocess.run([*mlflow_command(), "--version"])
    """
    exe = Path(sys.executable)
    for name in ("mlflow", "mlflow.exe"):
        script = exe.parent / name
        if script.is_file() and os.access(script, os.X_OK):
            return [script.as_posix()]
    return [exe.as_posix(), "-m", "mlflow"]


def ui_command(run_dir: str | os.PathLike, port: int = 5000) -> str:
    """The shell command that opens the MLflow UI on a run directory's local store.

    It names this environment's MLflow by absolute path (:func:`mlflow_command`), so it works
    in a plain shell without the virtual environment activated.

    Args:
        run_dir: the bundle's run directory (``runs/<task>[_<name>]``).
        port: the UI's port on 127.0.0.1.

    Returns:
        e.g. ``/abs/.venv/bin/mlflow ui --backend-store-uri sqlite:////abs/runs/lidc_demo/mlflow.db
        --default-artifact-root file:///abs/runs/lidc_demo/mlartifacts --host 127.0.0.1 --port 5000``.
        Runs keep their artifact location in the store, so the UI finds the artifacts of
        existing runs; ``--default-artifact-root`` only places experiments created later.

    Example::

        print("Open the MLflow UI:", ui_command("runs/lidc_demo"))
    """
    root = Path(local_artifact_root(run_dir)).as_uri()
    return (
        f"{shlex.join(mlflow_command())} ui --backend-store-uri {shlex.quote(local_tracking_uri(run_dir))} "
        f"--default-artifact-root {shlex.quote(root)} --host 127.0.0.1 --port {int(port)}"
    )


def runs_url(experiment_id: str | int, port: int = 5000, host: str = "127.0.0.1", view: bool = False) -> str:
    """The UI address of an experiment's runs table, ``http://<host>:<port>/#/experiments/<id>/runs``.

    MLflow 3 opens an experiment on a GenAI overview page (traces) without the runs; this
    address goes straight to the runs. ``view=True`` adds ``?viewStateShareKey=hsrdiff``: the
    table then opens with the metrics as columns and evaluations listed beside their trainings
    (runs_view.py; only for an experiment that has the view, which every bundle run writes).

    Example::

        runs_url("1")  # 'http://127.0.0.1:5000/#/experiments/1/runs'
        runs_url("1", view=True)  # 'http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=hsrdiff'
    """
    return f"http://{host}:{int(port)}/#/experiments/{experiment_id}/runs" + (f"?viewStateShareKey={VIEW_KEY}" if view else "")


def local_runs_url(run_dir: str | os.PathLike, experiment_name: str, port: int = 5000) -> str | None:
    """:func:`runs_url` of ``experiment_name`` in a run directory's local store, with the bundles'
    view when the experiment has it (None when there is no such store or experiment)."""
    db = Path(run_dir).resolve() / DB_NAME
    if not db.is_file():
        return None
    import mlflow

    exp = mlflow.MlflowClient(tracking_uri=local_tracking_uri(run_dir)).get_experiment_by_name(experiment_name)
    return runs_url(exp.experiment_id, port, view=has_runs_view(exp)) if exp is not None else None
