"""The Python API for notebooks and scripts: the CLI's functions behind a few names.

    import wingspan as ws
    data = ws.read("photos/")                     # data.inspect(), data.split(), data.preview()
    run = ws.train(data, epochs_finetune=4)       # run.history, run.plot(), run.metrics
    ev = run.evaluate()                           # ev.metrics, ev.report()
    preds = run.predict(["a.jpg", "field/"])      # a DataFrame
    run = ws.load("runs/my-run")                  # a run folder or a model bundle

Every name, argument and default is the CLI's (`wingspan.config` holds them), every
function calls the one the CLI calls, and mistakes raise the same `WingspanError`s. In
Jupyter, datasets, runs and evaluations display themselves (`_repr_html_`).
"""

from wingspan.api.dataset import Data, Inspection, demo_data, read
from wingspan.api.display import Html, Image, Images
from wingspan.api.evaluation import Evaluation
from wingspan.api.training import Run, is_main_process, load, resume, runs, train

__all__ = ["Data", "Evaluation", "Html", "Image", "Images", "Inspection", "Run", "demo_data",
           "is_main_process", "load", "read", "resume", "runs", "train"]
