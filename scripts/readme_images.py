"""Copy the demo's evaluation figures into ``docs/img`` for the README.

After ``bash scripts/demo.sh``, the demo run's MLflow store holds the evaluation run with its sample
grid and κ(t) curve; this script takes the newest finished evaluation run of the demo's experiment
and writes

* ``docs/img/demo_lidc_samples.png``: test images, the four readers, four samples, mean, entropy;
* ``docs/img/demo_lidc_kappa.png``: mean κ per sampling step (the paper's Figure 6);

each through a temporary name, so an interrupted copy leaves the previous image. It prints the
run's test metrics for the README caption.

Run::

    .venv/bin/python scripts/readme_images.py            # the LIDC demo
    .venv/bin/python scripts/readme_images.py --check    # exit 1 if the images differ from the run's
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = {"samples/samples_eval.png": "samples", "kappa/kappa_curve_eval.png": "kappa"}


def newest_evaluation_run(run_dir: Path, experiment: str):
    """The newest FINISHED evaluation run of ``experiment`` in the run folder's local MLflow store."""
    import mlflow

    from monai_hsrdiff.tracking.run import TAG
    from monai_hsrdiff.tracking.store import DB_NAME, local_tracking_uri

    if not (run_dir / DB_NAME).is_file():
        raise SystemExit(f"error: {run_dir / DB_NAME} does not exist; run `bash scripts/demo.sh` first.")
    client = mlflow.MlflowClient(tracking_uri=local_tracking_uri(run_dir))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: experiment {experiment!r} is not in {run_dir / DB_NAME}; run the demo first.")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{TAG}role` = 'evaluation' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit(f"error: no finished evaluation run in experiment {experiment!r}; run the demo's step 3.")
    return client, runs[0]


def main(argv: list[str] | None = None) -> int:
    from monai_hsrdiff.paths import default_run_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="lidc", choices=("lidc", "ms_lesion"))
    p.add_argument("--run-dir", default=None, help="demo run folder (default: the demo's, runs/<task>_demo)")
    p.add_argument("--out", default=str(REPO / "docs" / "img"), help="image folder (default docs/img)")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when an image differs or is missing")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir or default_run_dir(a.task, "demo")).resolve()
    client, run = newest_evaluation_run(run_dir, f"hsrdiff_{a.task}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    differs = False
    with tempfile.TemporaryDirectory() as tmp:
        for artifact, name in FIGURES.items():
            local = Path(client.download_artifacts(run.info.run_id, artifact, tmp))
            target = out / f"demo_{a.task}_{name}.png"
            if a.check:
                same = target.is_file() and filecmp.cmp(local, target, shallow=False)
                differs |= not same
                print(f"{'same' if same else 'DIFFERS'}: {target}")
                continue
            partial = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(local, partial)
            partial.replace(target)
            print(f"wrote {target}")
    m = run.data.metrics
    keys = ("test_ged16", "test_ged32", "test_hm_iou16", "test_mdm16", "test_fused_iou16", "test_entropy16")
    print(f"run {run.info.run_id}: " + ", ".join(f"{k} {m[k]:.3f}" for k in keys if k in m))
    return 1 if differs else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
