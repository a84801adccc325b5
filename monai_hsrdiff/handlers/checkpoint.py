"""Atomic checkpoints for resume, and finding the last complete one.

MONAI's ``CheckpointSaver`` writes with ``atomic=False``; a run killed during a write then
leaves a truncated file that looks like the newest checkpoint. This handler uses ignite's
own ``Checkpoint`` with ``DiskSaver(atomic=True)`` (temporary file, then rename), and
:func:`latest_checkpoint` skips any file that does not load, with a warning naming it.
:class:`AtomicCheckpointSaver` is MONAI's ``CheckpointSaver`` (the best ``model.pt``) with
the same atomic writes.

Each resume checkpoint also records whether the epoch-end handlers attached before the
checkpointer (validation, in the bundles) had finished; a checkpoint written at the last
iteration of an epoch whose validation was then killed makes :func:`resume_from_latest`
run them again instead of silently skipping that validation.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from monai_hsrdiff.errors import fail

__all__ = ["AtomicCheckpointSaver", "ResumeCheckpointer", "latest_checkpoint", "require_fresh_run", "resume_from_latest"]

PREFIX = "resume"
EPOCH_END = "epoch_end"  # checkpoint key of the epoch-end flag
_STEP = re.compile(rf"^{PREFIX}_checkpoint_(\d+)\.pt$")
# what DiskSaver(atomic=True) leaves when killed mid-write: tempfile.NamedTemporaryFile's name, never renamed
_PARTIAL = re.compile(r"^tmp[a-z0-9_]{8}$")

logger = logging.getLogger(__name__)


class _SaveThenRemove(DiskSaver):
    """``DiskSaver`` that deletes the checkpoints ignite drops only after the next one is saved.

    ignite's ``Checkpoint`` removes the oldest file *before* writing the new one, so during
    a write only ``n_saved - 1`` complete checkpoints exist; a kill or power loss then would
    find fewer fallbacks than promised. Removal is deferred until the new file is in place.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: list[str] = []

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        super().__call__(checkpoint, filename, metadata)
        for old in self._pending:
            if old != filename and (self.dirname / old).exists():
                super().remove(old)
        self._pending.clear()

    def remove(self, filename: str) -> None:
        self._pending.append(filename)


class _FixedNameSaver(_SaveThenRemove):
    """Atomic saver for MONAI's ``CheckpointSaver``: optionally one fixed file name (``model.pt``)."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname, atomic=True, require_empty=False, create_dir=True)
        self.filename = filename

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        super().remove(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) writing every file atomically.

    MONAI's saver writes in place and, for a fixed ``key_metric_filename``, deletes the old
    file first: a kill during the write of a new best ``model.pt`` leaves a truncated
    ``model.pt`` and no previous best. Here the new file is written under a temporary name
    and renamed over the old one, so ``model.pt`` is always a complete checkpoint.

    Example::

        AtomicCheckpointSaver("runs/lidc/checkpoints", {"network": net}, save_key_metric=True, key_metric_filename="model.pt")
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            checkpoint = getattr(self, name)  # AttributeError if MONAI renames them: the tests notice
            if checkpoint is not None:
                checkpoint.save_handler = _FixedNameSaver(self.save_dir, getattr(checkpoint.save_handler, "filename", None))


class _EpochEnd:
    """Saved in every resume checkpoint: had the epoch-end handlers attached before the
    checkpointer (validation) finished when it was written?"""

    def __init__(self) -> None:
        self.done = False

    def state_dict(self) -> dict[str, bool]:
        return {"done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = bool(state.get("done", False))


class ResumeCheckpointer:
    """Save everything needed to resume (network, optimizer, lr scheduler, trainer state, EMA).

    Args:
        save_dir: folder of the checkpoints (``resume_checkpoint_<iteration>.pt``).
        save_dict: name -> object with ``state_dict()``; include the trainer itself so its
            epoch/iteration counters are restored.
        every_n_epochs: save at the end of every n-th epoch (0: never).
        every_n_iterations: also save every n iterations (0: never); for long epochs, so a
            kill mid-epoch loses at most n iterations.
        n_saved: how many of the newest checkpoints to keep (>= 2 keeps a fallback when the
            newest is damaged on disk).

    Example::

        ResumeCheckpointer("runs/lidc/checkpoints", {"network": net, "optimizer": opt, "trainer": trainer}).attach(trainer)
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict[str, Any],
        every_n_epochs: int = 1,
        every_n_iterations: int = 0,
        n_saved: int = 2,
    ) -> None:
        if every_n_epochs < 0 or every_n_iterations < 0:
            raise ValueError(
                f"ResumeCheckpointer: every_n_epochs/every_n_iterations must be >= 0, got {every_n_epochs}/{every_n_iterations}"
            )
        self.save_dir = save_dir
        self.every_n_epochs = int(every_n_epochs)
        self.every_n_iterations = int(every_n_iterations)
        self.save_dict = save_dict
        self.n_saved = n_saved
        self._checkpoint: Checkpoint | None = None

    def attach(self, engine: Engine) -> None:
        """Attach to the trainer AFTER its own handlers, so an epoch-end save follows validation."""
        self._epoch_end = _EpochEnd()
        self._checkpoint = Checkpoint(
            {**self.save_dict, EPOCH_END: self._epoch_end},
            _SaveThenRemove(self.save_dir, atomic=True, require_empty=False, create_dir=True),
            filename_prefix=PREFIX,
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.iteration,
            greater_or_equal=True,  # re-writing the same iteration (to set the flag) is allowed
        )
        self._adopted = False
        if self.every_n_iterations:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_n_iterations), self._iteration_save)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_save)

    def _adopt_existing(self, engine: Engine) -> None:
        """Before the first save of a resumed run, count the earlier run's checkpoints as saved, so
        ``n_saved`` bounds the folder across restarts (ignite's list starts empty, and each resume
        would leave up to ``n_saved`` files nobody deletes). Only those older than the current
        iteration: a newer one is a damaged file ``latest_checkpoint`` skipped, left for inspection."""
        if self._adopted:
            return
        self._adopted = True
        older = sorted((it, p.name) for it, p in _candidates(Path(self.save_dir)) if it < engine.state.iteration)
        if older:
            self._checkpoint.load_state_dict({"_saved": older})

    def _saved_now(self, engine: Engine) -> bool:
        last = self._checkpoint.last_checkpoint if self._checkpoint else None
        return bool(last) and str(last).endswith(f"_{engine.state.iteration}.pt")

    def _iteration_save(self, engine: Engine) -> None:
        assert self._checkpoint is not None
        self._adopt_existing(engine)
        self._epoch_end.done = False
        self._checkpoint(engine)

    def _epoch_save(self, engine: Engine) -> None:
        assert self._checkpoint is not None
        self._adopt_existing(engine)
        self._epoch_end.done = True
        # the last iteration's checkpoint (written before validation) is re-written with the flag set
        if self._saved_now(engine) or (self.every_n_epochs and engine.state.epoch % self.every_n_epochs == 0):
            self._checkpoint(engine)


def _candidates(save_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in save_dir.glob(f"{PREFIX}_checkpoint_*.pt"):
        m = _STEP.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def latest_checkpoint(save_dir: str | Path) -> tuple[Path, dict] | None:
    """Return (path, loaded object) of the newest checkpoint that loads, or None.

    A checkpoint that fails to load (truncated, corrupt) is skipped with a warning naming
    it, and the previous one is tried.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return None
    for _, path in _candidates(save_dir):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to load means: not a usable checkpoint
            warnings.warn(f"skipping damaged checkpoint {path}: {type(e).__name__}: {e}", stacklevel=2)
            continue
        return path, obj
    return None


def resume_from_latest(engine: Engine, save_dir: str, load_dict: dict[str, Any]) -> str | None:
    """Attach a MONAI ``CheckpointLoader`` for the newest complete checkpoint in ``save_dir``.

    Returns the path it will load, or None (and logs it) when there is nothing to resume.
    Loaded at ``Events.STARTED`` so the trainer continues at the saved epoch/iteration.
    """
    found = latest_checkpoint(save_dir)
    if found is None:
        logger.info("resume: no checkpoint in %s, starting from scratch", save_dir)
        print(f"[resume] no checkpoint in {save_dir}; starting from scratch", flush=True)
        return None
    path, obj = found
    for partial in sorted(p for p in Path(save_dir).iterdir() if _PARTIAL.match(p.name)):
        print(f"[resume] removing {partial}: a checkpoint write interrupted before its rename", flush=True)
        partial.unlink()
    state = obj.get("trainer", {}) if isinstance(obj, dict) else {}
    print(
        f"[resume] resuming from {path} (trainer iteration {state.get('iteration', '?')}, "
        f"{state.get('epoch_length', '?')} iterations per epoch)",
        flush=True,
    )
    CheckpointLoader(load_path=str(path), load_dict=load_dict, map_location="cpu").attach(engine)
    # read by handlers that run at STARTED before the loader (the MLflow handler continues its run)
    engine.resumed_from = {"path": str(path), "iteration": state.get("iteration")}
    iteration, per_epoch = state.get("iteration"), state.get("epoch_length")
    epoch_end = obj.get(EPOCH_END, {}) if isinstance(obj, dict) else {}
    if epoch_end.get("done") is False and iteration and per_epoch and iteration % per_epoch == 0:
        print(
            f"[resume] epoch {iteration // per_epoch} ended but its end-of-epoch handlers (validation) did not "
            "finish before the run stopped; running them again first",
            flush=True,
        )
        # registered after the loader's STARTED handler: runs on the restored counters
        engine.add_event_handler(Events.STARTED, lambda e: e.fire_event(Events.EPOCH_COMPLETED))
    return str(path)


def require_fresh_run(save_dir: str | Path) -> None:
    """Stop a run that does NOT resume when ``save_dir`` already holds resume checkpoints.

    A fresh run there would overwrite the earlier run's best ``model.pt`` and mix its own
    checkpoints with the older (possibly newer-numbered) ones that a later ``--resume True``
    would pick up. The message offers the three ways on.
    """
    found = _candidates(Path(save_dir)) if Path(save_dir).is_dir() else []
    if found:
        raise fail(
            f"{save_dir} already holds checkpoints of an earlier run (newest: {found[0][1].name}).\n"
            "  Continue that run with --resume True, start a separate run with --run_name NAME,\n"
            f"  or delete {Path(save_dir).parent} to start this one from scratch."
        )
