"""MLflow tracking for HSRDiff bundles: the store, the run, its two handlers, the logged figures and run info.

A bundle declares one :class:`TrackingRun` (``tracking_run``) and hands it to the run-lifecycle
handler :class:`HSRDiffMLFlowHandler` (training, validation, evaluation) and to the evaluator's
:class:`FiguresHandler` (κ curve, sample grids). See docs/tracking.md for what is logged and how
to open the UI, and runs_view.py for the runs-table view the printed address opens.
"""

from .artifacts import SampleCollector, kappa_curve_figure, sample_grid_figure
from .figures import FiguresHandler
from .handler import HSRDiffMLFlowHandler, scalar_output
from .run import TrackingRun, is_nonzero_rank
from .runs_view import VIEW_KEY, ensure_runs_view, runs_view_state
from .run_info import bundle_config, config_params, count_parameters, dataset_info, dataset_input, git_commit, source_tags
from .store import (
    TrackingStore,
    check_tracking_store,
    local_artifact_root,
    local_runs_url,
    local_tracking_uri,
    mlflow_command,
    resolve_tracking_store,
    runs_url,
    ui_command,
)

__all__ = [
    "FiguresHandler",
    "HSRDiffMLFlowHandler",
    "SampleCollector",
    "TrackingRun",
    "TrackingStore",
    "VIEW_KEY",
    "bundle_config",
    "check_tracking_store",
    "config_params",
    "count_parameters",
    "dataset_info",
    "dataset_input",
    "ensure_runs_view",
    "git_commit",
    "is_nonzero_rank",
    "kappa_curve_figure",
    "local_artifact_root",
    "local_runs_url",
    "local_tracking_uri",
    "mlflow_command",
    "resolve_tracking_store",
    "runs_url",
    "runs_view_state",
    "sample_grid_figure",
    "source_tags",
    "scalar_output",
    "ui_command",
]
