"""Training: the two-stage recipe, the feature and decode caches, checkpoints and resume.

`train`, `resume` and `MACHINE_SETTINGS` load `wingspan.training.run` when first used, so
that predict, evaluate and serve, which need only this package's data helpers, start
without the training stack (scikit-learn's model selection, the schedulers)."""

__all__ = ["MACHINE_SETTINGS", "resume", "train"]


def __getattr__(name: str):
    if name in __all__:
        from wingspan.training import run

        return getattr(run, name)
    raise AttributeError(f"module 'wingspan.training' has no attribute '{name}'")
