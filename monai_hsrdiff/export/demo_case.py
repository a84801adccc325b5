"""Export ONE demo case for 3D Slicer: a SYNTHETIC source volume made from a demo item, then inference on it.

The demo data sets (``python -m preprocessing.demo``) have no source scan (their images are
synthetic slices), so this writes a small SYNTHETIC volume from one demo item — the item's
slice repeated ``num_slices`` times, LIDC back in Hounsfield units, MS-Lesion as 4 positive
MRI-like volumes — as NIfTI (file names start with ``SYNTHETIC_``, the NIfTI ``descrip`` says
SYNTHETIC, and ``summary.json`` has ``"synthetic": true``), and runs the same inference as a
real scan (the bundle's ``inference``: ``train.json`` + ``inference.json`` + ``demo.json``,
:func:`monai_hsrdiff.inference.run_bundle_inference`) on it.

``python -m monai_hsrdiff.export.demo_case --task lidc`` (after demo training) prints the
folder to open in 3D Slicer: ``<run_dir>/inference/SYNTHETIC_<item>``, with the source volume
in ``<run_dir>/inference/sources/SYNTHETIC_<item>/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["demo_case", "main", "write_demo_source"]


def write_demo_source(item: str | os.PathLike, out_dir: str | os.PathLike, num_slices: int = 3) -> list[Path]:
    """Write a SYNTHETIC NIfTI source volume (one file per channel) from a demo item; return the files.

    Args:
        item: a demo item ``.npz`` (``monai_hsrdiff.data.items`` format).
        out_dir: folder for the files (created).
        num_slices: the item's slice is repeated this many times along k.

    The geometry uses the item meta's ``source_spacing`` (pixel, pixel, slice) and
    ``source_origin``, identity direction. LIDC intensities are mapped back from [-1, 1] to
    HU with the item's HU window; MS-Lesion channels are shifted to be > 0 inside the brain
    (z-scoring at inference removes the shift) and 0 outside.
    """
    import nibabel as nib

    from monai_hsrdiff.data.items import index_to_physical_matrix, load_item
    from monai_hsrdiff.tasks import get_task

    data = load_item(item)
    meta, image = data["meta"], data["image"]  # image (C, H, W)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spacing = meta.get("source_spacing", [1.0, 1.0, 1.0])
    origin = meta.get("source_origin", [0.0, 0.0, 0.0])
    lps = index_to_physical_matrix(origin, spacing, np.eye(3).ravel())
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    vol = np.repeat(np.transpose(image, (0, 2, 1))[..., None], num_slices, axis=3)  # (C, I=cols, J=rows, K)
    task = get_task(meta.get("task", "lidc"))
    vol = task.source_from_item(vol, meta)
    names = list(task.channels)
    stem = f"SYNTHETIC_{Path(item).stem}"
    files = []
    for c, name in enumerate(names):
        img = nib.Nifti1Image(vol[c].astype(np.float32), ras)
        img.set_qform(ras, code=1)
        img.set_sform(ras, code=1)
        img.header["descrip"] = b"SYNTHETIC demo volume (monai-hsrdiff)"
        path = out_dir / (f"{stem}.nii.gz" if len(names) == 1 else f"{stem}_{name}.nii.gz")
        nib.save(img, path)
        files.append(path)
    return files


def demo_case(
    task: str = "lidc",
    checkpoint: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    item: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    num_samples: int = 8,
    steps: int = 10,
    overwrite: bool = True,
    seed: int = 0,
    num_slices: int = 3,
    configs: Sequence[str | os.PathLike] = (),
    sampler: str | None = None,
) -> Path:
    """Write a SYNTHETIC source from one demo item and export its inference case; return the case folder.

    Args:
        task: ``"lidc"`` or ``"ms_lesion"``.
        checkpoint: default ``<run_dir>/checkpoints/model.pt`` of the demo run (``runs/<task>_demo``).
        dataset_dir: demo data (default ``data/demo_<task>``); its first test item is used.
        item: a specific item file instead.
        out: case folder (default ``<run_dir>/inference/SYNTHETIC_<item>``).
        num_samples, steps, seed: N samples, sampling steps (network calls per sample), seed.
        overwrite: replace an earlier export of the same case (only a case folder: ``out``
            holding anything else is refused, naming the entries, and nothing is deleted).
        num_slices: slices of the synthetic source volume.
        configs: further override files after ``demo.json`` (as used for training).
        sampler: one of ``SAMPLERS``; default the bundle's inference sampler (``inference.json``
            ``sampler``: SDE-DPM-Solver++(2M)), as a real case gets.
    """
    from monai_hsrdiff.data import load_datalist
    from monai_hsrdiff.export.slicer import check_output_folder
    from monai_hsrdiff.inference.inferer import run_bundle_inference
    from monai_hsrdiff.paths import bundle_root, default_dataset_dir, default_run_dir
    from monai_hsrdiff.tasks import get_task

    if item is None:
        dataset_dir = dataset_dir or default_dataset_dir(task, demo=True)
        datalist = get_task(task).require_datalist(dataset_dir, ["test"])
        item = load_datalist(datalist, "test")[0]["item"]
    case = f"SYNTHETIC_{Path(item).stem}"
    inference_dir = Path(default_run_dir(task, "demo")) / "inference"
    source_dir = inference_dir / "sources" / case
    # before the source is written: an --out that overlaps it or a protected folder, or holds
    # anything but an earlier case, is refused (overwrite replaces only an earlier export)
    out = check_output_folder(out or inference_dir / case, overwrite, inputs=[source_dir])
    # folders this call creates: removed again when the export fails (no training yet, a bad
    # checkpoint), so a refused export leaves the run folder as it was
    created = [p for p in (source_dir, *source_dir.parents) if not p.exists()]
    try:
        sources = write_demo_source(item, source_dir, num_slices)
        bundle = Path(bundle_root(task))
        config_files = [bundle / "train.json", bundle / "inference.json", bundle / "demo.json", *[Path(c) for c in configs]]
        keys = {"input": [str(f) for f in sources] if len(sources) > 1 else str(sources[0]), "output_dir": str(out),
                "num_samples": num_samples, "sampling_steps": steps, "overwrite": bool(overwrite), "seed": seed}
        if sampler is not None:
            keys["sampler"] = sampler
        if checkpoint is not None:
            keys["checkpoint"] = str(checkpoint)
        return run_bundle_inference(config_files, keys)
    except BaseException:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    from monai_hsrdiff.diffusion.samplers import SAMPLERS
    from monai_hsrdiff.errors import BundleError, InferenceInputError

    p = argparse.ArgumentParser(prog="python -m monai_hsrdiff.export.demo_case", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("lidc", "ms_lesion"), default="lidc")
    p.add_argument("--checkpoint", default=None, help="default runs/<task>_demo/checkpoints/model.pt")
    p.add_argument("--dataset-dir", default=None, help="demo data folder (default data/demo_<task>)")
    p.add_argument("--item", default=None, help="a demo item .npz (default: the first test item)")
    p.add_argument("--out", default=None, help="case folder (default runs/<task>_demo/inference/SYNTHETIC_<item>)")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="network calls per sample (default 10)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the bundle's inference sampler (dpmpp_2m_sde)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        case = demo_case(a.task, a.checkpoint, a.dataset_dir, a.item, a.out, a.num_samples, a.steps, True, a.seed,
                         sampler=a.sampler)
    except BundleError as e:
        return int(e.code or 2)
    except (InferenceInputError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[hsrdiff] SYNTHETIC demo case for 3D Slicer: {case}")
    print(f"[hsrdiff]   source volume: {case.parent / 'sources' / case.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
