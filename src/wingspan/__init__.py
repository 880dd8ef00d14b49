"""wingspan: train, evaluate, explain, export and serve image classifiers by transfer learning.

    import wingspan as ws
    data = ws.read("photos/")
    run = ws.train(data, backbone="efficientnet_lite0", epochs_finetune=4)
    ev = run.evaluate()

The names below come from `wingspan.api` when first used, so `import wingspan` stays
light (no torch until something needs it).
"""

__version__ = "0.1.0"

_API = ("Data", "Evaluation", "Image", "Inspection", "Run", "demo_data", "is_main_process",
        "load", "read", "resume", "runs", "train")
__all__ = [*_API, "Interrupted", "TrainConfig", "WingspanError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        from wingspan import api

        return getattr(api, name)
    if name == "TrainConfig":
        from wingspan.config import TrainConfig

        return TrainConfig
    if name == "Interrupted":  # what a run stopped by Ctrl-C raises: `except ws.Interrupted`
        from wingspan.training.run import Interrupted

        return Interrupted
    if name == "WingspanError":
        from wingspan.errors import WingspanError

        return WingspanError
    raise AttributeError(f"module 'wingspan' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})  # (__version__ is in both)
