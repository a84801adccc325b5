"""MLflow tracking for HSRDiff bundles: the store, the handler, the logged figures and run info.

See docs/tracking.md for what is logged and how to open the UI.
"""

from .artifacts import SampleCollector, kappa_curve_figure, sample_grid_figure
from .handler import HSRDiffMLFlowHandler, is_nonzero_rank, scalar_output
from .run_info import bundle_config, config_params, count_parameters, dataset_info, find_bundle_parser, git_commit
from .store import (
    TrackingStore,
    check_tracking_store,
    local_artifact_root,
    local_tracking_uri,
    resolve_tracking_store,
    ui_command,
)

__all__ = [
    "HSRDiffMLFlowHandler",
    "SampleCollector",
    "TrackingStore",
    "bundle_config",
    "check_tracking_store",
    "config_params",
    "count_parameters",
    "dataset_info",
    "find_bundle_parser",
    "git_commit",
    "is_nonzero_rank",
    "kappa_curve_figure",
    "local_artifact_root",
    "local_tracking_uri",
    "resolve_tracking_store",
    "sample_grid_figure",
    "scalar_output",
    "ui_command",
]
