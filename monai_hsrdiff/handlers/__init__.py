from .checkpoint import AtomicCheckpointSaver, ResumeCheckpointer, latest_checkpoint, resume_from_latest
from .eval_checkpoint import load_checkpoint_for, load_network_weights

__all__ = [
    "AtomicCheckpointSaver",
    "ResumeCheckpointer",
    "latest_checkpoint",
    "load_checkpoint_for",
    "load_network_weights",
    "resume_from_latest",
]
