"""Training: the two-stage recipe, the feature and decode caches, checkpoints and resume.

`train` and `resume` load what they need when first used, so that
predict, evaluate and serve, which need only this package's data helpers, start without
the training stack (scikit-learn's model selection, the schedulers).

    run.py      train: a new run's folder, then the two stages (stages.py), interruptible
    finish.py   the end of a run: the best model's results, calibration, unknown answer
    resuming.py resume: a stopped or killed run, checked, then taken up where it stopped
                (not resume.py: importing it would put the module in place of the function
                as this package's `resume`)
"""

__all__ = ["MACHINE_SETTINGS", "resume", "train"]


def __getattr__(name: str):
    if name == "train":
        from wingspan.training.run import train

        return train
    if name == "MACHINE_SETTINGS":
        from wingspan.config import MACHINE_SETTINGS

        return MACHINE_SETTINGS
    if name == "resume":
        from wingspan.training.resuming import resume

        return resume
    raise AttributeError(f"module 'wingspan.training' has no attribute '{name}'")
