"""Training: the two-stage recipe, the feature and decode caches, checkpoints and resume."""

from wingspan.training.run import MACHINE_SETTINGS, resume, train

__all__ = ["MACHINE_SETTINGS", "resume", "train"]
