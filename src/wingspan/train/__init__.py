"""Training: the two-stage recipe, the feature and decode caches, checkpoints and resume."""

from wingspan.train.run import resume, train

__all__ = ["resume", "train"]
