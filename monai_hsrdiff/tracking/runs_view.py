"""The runs-table view the printed MLflow address opens: the metrics as columns, trainings beside their evaluations.

MLflow 3's runs table starts with the columns Source, Models and Dataset and no metric, and it
nests an evaluation under its training run, collapsed. A person who opens the address a run
prints would see no GED at all. MLflow's own "shared view" mechanism fixes that without
touching the browser: the UI reads a view from the experiment tag
``mlflow.sharedViewState.<key>`` (JSON: the selected columns and the sort) when the address
carries ``?viewStateShareKey=<key>``. The bundles write the key ``hsrdiff``:

- columns: ``val_ged16`` / ``val_hm_iou16`` (validation during training),
  ``<split>_ged16`` / ``<split>_hm_iou16`` of every split evaluated (``test`` by default), and
  the params ``preset`` and ``prediction`` (not Dataset, MLflow's widest default column: with it
  the metrics start off-screen on a 1440-pixel-wide window; each run page names its data set);
- sorted by run name, ascending: each run directory's evaluations sit just above its training
  (``lidc_demo-evaluation``, ``lidc_demo-training``). Any sort but the start time makes the UI
  list child runs flat, so the evaluation's metrics show without expanding its parent.

The UI says "You're viewing a shared view" above it; *Override saved view* keeps it as the
user's own, *Exit shared view* goes back to MLflow's default columns. Only the tag under this
module's key is ever written (an evaluation of another split adds its columns; the splits seen
are kept in the view); a store that refuses the tag (e.g. a server without write access to
experiments) costs a warning and the plain address, never the run.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mlflow

__all__ = ["VIEW_KEY", "VIEW_TAG", "ensure_runs_view", "has_runs_view", "runs_view_state"]

VIEW_KEY = "hsrdiff"
VIEW_TAG = "mlflow.sharedViewState." + VIEW_KEY
#: the UI's run-name sort key (its label in the UI: "Run Name")
SORT_KEY = "tags.`mlflow.runName`"
PARAMS = ("preset", "prediction")
logger = logging.getLogger("monai_hsrdiff.tracking")


def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"  # the UI's column key: attributes.`Dataset`, metrics.`val_ged16`, ...


def runs_view_state(splits: tuple[str, ...] = ("test",)) -> dict[str, Any]:
    """The view, as the UI reads it from the tag: selected columns and the sort.

    Args:
        splits: the evaluated splits whose ``<split>_ged16`` / ``<split>_hm_iou16`` get columns
            (``val`` is always there: the validation during training).

    The state also records the splits (``hsrdiff_splits``; the UI ignores keys it does not
    know), so a later run rebuilds the columns from them rather than from an older column list.

    Example::

        runs_view_state()["selectedColumns"][:2]  # ['metrics.`val_ged16`', 'metrics.`val_hm_iou16`']
    """
    splits = tuple(dict.fromkeys(s for s in splits if s != "val"))
    metrics = [f"{s}_{m}" for s in ("val", *splits) for m in ("ged16", "hm_iou16")]
    columns = [*(_column("metrics", m) for m in metrics), *(_column("params", p) for p in PARAMS)]
    return {"selectedColumns": columns, "orderByKey": SORT_KEY, "orderByAsc": True, "hsrdiff_splits": list(splits)}


def _stored_state(value: str | None) -> dict[str, Any]:
    try:
        state = json.loads(value or "{}")
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


def ensure_runs_view(client: "mlflow.MlflowClient", experiment_id: str, split: str | None = None) -> bool:
    """Write (or extend) the experiment's ``hsrdiff`` view; True when the experiment has it.

    The splits already in the view are kept and ``test`` (the default evaluation split) and
    ``split`` are added; the tag is written only when that changes it. A failing store call
    warns and returns False (the caller then prints the plain runs address).
    """
    try:
        tags = client.get_experiment(experiment_id).tags or {}
        old = _stored_state(tags.get(VIEW_TAG)).get("hsrdiff_splits", [])
        old = [s for s in old if isinstance(s, str)] if isinstance(old, list) else []
        value = json.dumps(runs_view_state(("test", *old, *([split] if split else []))))
        if tags.get(VIEW_TAG) != value:
            client.set_experiment_tag(experiment_id, VIEW_TAG, value)
        return True
    except Exception as e:  # a view is a convenience: never stop or pause tracking for it
        logger.warning(f"MLflow tracking: could not save the runs-table view on experiment {experiment_id} "
                       f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); the printed address opens MLflow's default table")  # fmt: skip
        return False


def has_runs_view(experiment: Any) -> bool:
    """Whether an MLflow experiment carries the ``hsrdiff`` view (the address may then name it)."""
    return bool(_stored_state((getattr(experiment, "tags", None) or {}).get(VIEW_TAG)).get("selectedColumns"))
