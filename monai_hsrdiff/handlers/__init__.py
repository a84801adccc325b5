from .checkpoint import AtomicCheckpointSaver, ResumeCheckpointer, latest_checkpoint, resume_from_latest
from .epoch_means import EpochMeans, every_n_iterations
from .eval_checkpoint import load_checkpoint_for, load_network_weights

__all__ = [
    "AtomicCheckpointSaver",
    "EpochMeans",
    "ResumeCheckpointer",
    "latest_checkpoint",
    "load_checkpoint_for",
    "load_network_weights",
    "every_n_iterations",
    "resume_from_latest",
]
