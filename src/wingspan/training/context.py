"""What a run carries between its stages: config, model, data, progress, and the run folder."""

from __future__ import annotations

import csv
import functools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from lightning_fabric import Fabric
from rich.console import Console

from wingspan.config import NOT_LEARNT, TrainConfig
from wingspan.data.taxonomy import Taxonomy
from wingspan.errors import WingspanError, first_line
from wingspan.files import atomic_path, write_text
from wingspan.models.classifier import Classifier
from wingspan.models.policy import Policy
from wingspan.parallel import gather_objects
from wingspan.training.checkpoint import save_checkpoint
from wingspan.training.data import LabelledImages
from wingspan.training.folder import (
    CHECKPOINTS_DIR,
    HISTORY_FILE,
    best_checkpoint_file,
    last_checkpoint,
    splits_digest,
)


def learning_settings(config: TrainConfig) -> dict:
    """The settings a resumed run must keep (as JSON gives them back): all but NOT_LEARNT."""
    return json.loads(json.dumps({k: v for k, v in asdict(config).items()
                                  if k not in NOT_LEARNT},
                                 default=str))  # (a Path given in Python, say)


HISTORY_FIELDS = ["stage", "epoch", "train_loss", "train_acc", "train_macro_f1", "val_loss",
                  "val_acc", "val_macro_f1", "lr", "images_per_s", "seconds", "elapsed"]


@dataclass
class RunState:
    """Where a run is; saved in every checkpoint so a killed run picks up here."""

    stage: str = "head"  # head | finetune | done
    epoch: int = 0  # next epoch of the stage
    step: int = 0  # batches already done in that epoch (stage 2 saves mid-epoch)
    # The batches per epoch the stage's schedule was sized with, at its start (0: not yet):
    # a resumed run keeps it, whatever is readable now.
    steps_per_epoch: int = 0
    best_f1: float = -1.0
    best_loss: float = float("inf")  # breaks ties in best_f1
    best_stage: str = ""
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the stage last improved (early stopping)
    history: list[dict] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    partial: dict = field(default_factory=dict)  # running sums of an interrupted epoch
    profile: dict = field(default_factory=dict)  # stage -> seconds spent per kind of work
    engines: dict = field(default_factory=dict)  # the policy's choices; a resumed run keeps them
    skipped: dict = field(default_factory=dict)  # path -> why, images that could not be read
    # How many of `skipped` were known when this epoch's order was set (None: all): a
    # resumed epoch leaves out the same images, so its step count points at the same batches.
    epoch_skipped: int | None = None
    # Where the backbone's first weights came from: a resumed run loads none of its own.
    weights_source: str = ""
    # The run folder (absolute) whose checkpoint or model they were, where it keeps its
    # splits.csv: its train and val images are no fair test of this run either.
    started_from: str = ""
    # The size the model was built at when not --image-size's: a resized ViT's whose weights
    # it started from (--weights RUN), which a resume, loading no weights, must build again.
    input_size: int | None = None
    # What train.log last said (None: as at the start), kept so that a resumed run does not
    # say it again as if new: per level, whether the loss is class-weighted; and the
    # (training, val) images known to be unreadable.
    loss_weighted: dict[str, bool] | None = None
    unreadable_said: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


STRICT_HINT = ("Without --strict, unreadable images are skipped for the rest of the run and "
               "listed.")


@dataclass
class TrainData:
    level: str  # the finest trained level: what the model predicts and is selected on
    classes: list[str]  # its classes
    levels: list[str]  # every trained level, coarse to fine (labels have one column each)
    level_classes: dict[str, list[str]]
    taxonomy: Taxonomy | None
    rare: dict[str, str]  # rare finest classes -> the parent-level class they train as
    train: LabelledImages  # training transform
    train_clean: LabelledImages  # evaluation transform, for the feature cache's clean view
    val: LabelledImages
    class_weights: dict[str, torch.Tensor | None]  # per level, for the loss
    level_weights: dict[str, float]
    sample_weights: torch.Tensor | None  # for the weighted sampler
    test_images: int = 0  # the test split: never trained or chosen on, so scored fairly


@dataclass
class Run:
    dir: Path
    config: TrainConfig
    model: Classifier
    policy: Policy
    data: TrainData
    state: RunState
    workers: int
    fabric: Fabric  # this process's: its rank, device and the training step's precision
    quiet: bool = False
    weights_source: str | None = None
    resume_from: dict | None = None  # the checkpoint being resumed, until its stage restores it
    # soft_wrap: as the CLI's, a long line (a path) is left whole for the terminal
    console: Console = field(default_factory=lambda: Console(stderr=True, soft_wrap=True))
    loaders: dict = field(default_factory=dict)  # kept between epochs (persistent workers)
    # Under DDP with --strict: the first unreadable image this rank met, raised by every
    # rank together at the next share_unreadable.
    strict_stop: str | None = None
    # The head stage's best head and what best.pt says of it, until the next checkpoint
    # writes them (keep_best).
    best_head: tuple[dict, dict] | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes (logs, progress, checkpoints, bundle)."""
        return self.fabric.is_global_zero

    @property
    def show_progress(self) -> bool:
        return self.is_main and not self.quiet

    @property
    def device(self) -> torch.device:
        return self.policy.device

    @functools.cached_property
    def splits_digest(self) -> str | None:
        return splits_digest(self.dir)

    @property
    def checkpoints(self) -> Path:
        return self.dir / CHECKPOINTS_DIR

    @property
    def image_size(self) -> int:
        return self.model.preprocessing.input_size

    def log(self, message: str, caveat: bool = False, shown: bool = True) -> None:
        """A line of train.log, shown as it is written. `caveat`: what the figures or the
        run lack, or how to go on, shown (on stderr) even with --quiet, which hides
        progress, not that. `shown=False`: train.log's alone (an error the caller raises,
        which the CLI prints)."""
        if not self.is_main:
            return
        stamp = time.strftime("%H:%M:%S")
        # (UTF-8 as every file of the run; a name of other bytes escaped, not a traceback)
        with open(self.dir / "train.log", "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"{stamp} {message}\n")
        if not shown:
            return
        if not self.quiet:
            self.console.print(message, highlight=False, markup=False)  # paths, class names
        elif caveat:
            print(message, file=sys.stderr)

    def note_unreadable(self, failed: list[tuple[str, str]]) -> None:
        """Images that could not be read: left out for the rest of the run and listed in
        train.log and metrics.json (with `strict`, an error instead)."""
        new = [(path, why) for path, why in failed if path not in self.state.skipped]
        if new and self.config.strict:
            if self.fabric.world_size == 1:
                raise WingspanError(new[0][1], hint=STRICT_HINT)
            # The other ranks are on their way to a collective: raising here would leave
            # them to die on a closed connection. All stop at the next share_unreadable.
            self.strict_stop = self.strict_stop or new[0][1]
            return
        for path, why in new:
            self.state.skipped[path] = why
            self.log(f"Skipping an unreadable image for the rest of the run: {why}",
                     caveat=True)

    def share_unreadable(self) -> None:
        """Every rank learns what the others could not read (so all leave out the same)."""
        if self.fabric.world_size > 1:
            parts = gather_objects(self.fabric, [self.state.skipped, self.strict_stop])
            stops = [stop for _, stop in parts if stop]
            if stops:  # every rank, the same error (the CLI prints rank 0's)
                raise WingspanError(stops[0], hint=STRICT_HINT, every_rank=True)
            for skipped, _ in parts:
                self.note_unreadable(list(skipped.items()))

    def readable(self, images: LabelledImages) -> torch.Tensor:
        """A mask of the images not known to be unreadable."""
        return torch.tensor([path not in self.state.skipped for path in images.paths],
                            dtype=torch.bool)

    def add_history(self, row: dict) -> None:
        self.state.history.append(row)
        if not self.is_main:
            return
        with atomic_path(self.dir / HISTORY_FILE) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(self.state.history)

    def save(self, optimizer=None) -> None:
        """The `last` checkpoint: everything needed to continue from this moment, on any
        number of processes (rank 0 writes it; the schedule follows from the step count)."""
        if not self.is_main:
            return
        self.write_best()  # (before last.pt, whose state names that best epoch)
        save_checkpoint(last_checkpoint(self.dir), {
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer else None,
            "state": self.state.to_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                         else None),
            "precision": self.fabric.strategy.precision.state_dict(),  # fp16's loss scale
            "settings": learning_settings(self.config),  # what config.yaml must still say
            "splits": self.splits_digest,  # and splits.csv
            "input_size": self.model.backbone.input_size,  # (a ViT's weights fit it only)
        })

    def restore_optimizer(self, optimizer) -> None:
        """On resume, continue the optimizer where the checkpoint left it (the schedule
        follows from the epoch and step)."""
        if self.resume_from and self.resume_from.get("optimizer"):
            try:
                optimizer.load_state_dict(self.resume_from["optimizer"])
            except ValueError as e:  # its parameter groups differ: another version's
                self.log(f"The optimizer's state in the checkpoint does not fit this "
                         f"version's parameter groups ({first_line(e)}): it starts afresh, "
                         "the weights and schedule as saved.", caveat=True)
            if self.resume_from.get("precision"):
                self.fabric.strategy.precision.load_state_dict(self.resume_from["precision"])
        self.resume_from = None

    def consider_best(self, f1: float, stage: str, epoch: int,
                      loss: float = float("inf")) -> bool:
        """Keep the model if it has the best validation macro-F1 so far, or the same with a
        lower validation loss: on a small or easy val split the macro-F1 saturates (Leeds
        reaches 1.0 in a few head epochs), and without the tie-break no fine-tuned epoch
        could ever be kept."""
        better = f1 > self.state.best_f1 or (
            f1 == self.state.best_f1 and loss < self.state.best_loss - self.config.min_delta)
        if not better:
            self.state.bad_epochs += 1
            return False
        self.state.bad_epochs = 0
        self.keep_best(f1, stage, epoch, loss, head_only=stage == "head")
        return True

    def keep_best(self, f1: float, stage: str, epoch: int, loss: float,
                  head_only: bool = False) -> None:
        """The model as it is now becomes the best one: in the state, and in best.pt.
        `head_only` (the head stage, whose backbone stays as it is): the head is kept in
        memory and written to best.pt with the next checkpoint. Such an epoch may take
        milliseconds, and rewriting the whole model each time (a ResNet-50's 94 MB, with
        last.pt's) was 80% of the stage."""
        self.state.best_f1, self.state.best_stage, self.state.best_epoch = f1, stage, epoch
        self.state.best_loss = loss
        if not self.is_main:
            return
        said = {"stage": stage, "epoch": epoch, "val_macro_f1": f1,
                "input_size": self.model.backbone.input_size}
        self.best_head = None
        if head_only:
            self.best_head = ({k: v.detach().clone()
                               for k, v in self.model.head.state_dict().items()}, said)
        else:
            save_checkpoint(best_checkpoint_file(self.dir),
                            {"model": self.model.state_dict(), **said})

    def write_best(self) -> None:
        """best.pt from the head kept by keep_best(head_only=True), if any: the backbone
        as it is now (still the one that head was trained on), and that head."""
        if self.best_head is None:
            return
        head, said = self.best_head
        model = self.model.state_dict()
        model.update({f"head.{k}": v for k, v in head.items()})
        save_checkpoint(best_checkpoint_file(self.dir), {"model": model, **said})
        self.best_head = None

    def timing(self, stage: str, kind: str, seconds: float) -> None:
        """Add to the time profile: data, forward, backward, eval, feature_cache, setup
        (seconds) or images (a count)."""
        spent = self.state.profile.setdefault(stage, {})
        spent[kind] = spent.get(kind, 0.0) + seconds

    def write_json(self, name: str, data: dict) -> None:
        if self.is_main:
            write_text(self.dir / name, json.dumps(data, indent=2, default=str))
