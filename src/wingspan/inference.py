"""Running a model bundle on image files: the one path that predict and evaluate share,
so both see every image exactly the same way."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from wingspan.config import BATCH_SIZE, MAX_BATCH, AugmentConfig
from wingspan.data.csvfiles import name_as_read
from wingspan.data.images import max_pixels, open_rgb, skip_reason
from wingspan.data.taxonomy import Taxonomy
from wingspan.data.transforms import eval_transform
from wingspan.errors import WingspanError, counted
from wingspan.models import load_bundle, resolve_policy
from wingspan.models.unknown import deepest_known
from wingspan.parallel import check_default_dtype
from wingspan.progress import track
from wingspan.training.data import Loader, resolve_workers, room_for_workers
from wingspan.training.folder import CONFIG_FILE, find_bundle
from wingspan.training.lossy_check import avoided_engines


def check_reading(batch_size: int, workers: int | None, per_machine: int = 1) -> int:
    """The batch size and data workers to read images with, checked before a model is
    looked for (-1 workers, or 514 for 4 cores, refused as train's are); the workers."""
    if not 1 <= batch_size <= MAX_BATCH:  # (99999999999999999999 overflowed islice)
        raise WingspanError(f"--batch-size {batch_size} (batch_size= in Python): must be "
                            f"1 to {MAX_BATCH:,}.", hint="32 to 256 suits most machines.")
    return resolve_workers(workers, per_machine)


def run_dir_of(bundle: Path) -> Path | None:
    """The run folder a bundle sits in (runs/NAME/model), or None for one that stands
    alone."""
    bundle = Path(bundle)
    return bundle.parent if (bundle.parent / CONFIG_FILE).is_file() else None


def output_home(bundle: Path) -> Path:
    """Where a model's outputs go by default (evaluation-*, export/, explain/): its run
    folder; else the bundle's own folder (a file bundle: a folder named after it), so two
    bundles side by side never write over each other's."""
    bundle = Path(bundle)
    return run_dir_of(bundle) or (bundle if bundle.is_dir() else bundle.with_suffix(""))


def spelt_as_trained(predictor: Predictor) -> dict[str, dict[str, str]]:
    """{level: {name read now: the model's name}} for a model trained before folder names
    and taxonomy.csv values lost their end spaces: it knows "monarch " (its genus "Danaus ",
    a rare class "white " it merged) where the data now reads "monarch". A model that
    knows both names keeps each to its own."""
    known = {**(predictor.taxonomy.classes if predictor.taxonomy else {}),
             predictor.level: [*predictor.classes, *predictor.rare]}
    return {lv: {name_as_read(c): c for c in names if name_as_read(c) not in names}
            for lv, names in known.items()}


class _Images(Dataset):
    """Files -> tensors; a file that cannot be read becomes an error message, not a crash."""

    def __init__(self, paths: Sequence[str], views: list[v2.Transform], size: int, draft: int):
        self.paths, self.views, self.size, self.draft = list(paths), views, size, draft
        self.budget = max_pixels()  # the call's, taken along to the worker processes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = open_rgb(self.paths[i], draft=self.draft, budget=self.budget)
            return torch.stack([view(image) for view in self.views]), ""
        except WingspanError as e:
            return torch.zeros(len(self.views), 3, self.size, self.size), skip_reason(e)


@dataclass
class Prediction:
    path: str
    probs: np.ndarray | None  # temperature-scaled probabilities of the finest level
    logits: np.ndarray | None
    error: str = ""
    heads: dict[str, np.ndarray] | None = None  # each coarser level's own head (softmax)
    unknown: dict[str, float] | None = None  # the unknown score per level (higher: less known)
    known_level: str | None = None  # the finest level that passes its threshold (None: none)
    every_score: dict[str, float] | None = None  # finest level, each score (run(every_score))
    features: np.ndarray | None = None  # pooled backbone features (run(with_features))
    view_logits: np.ndarray | None = None  # (views, classes): each view's (one without TTA)


def view_log_mean(view_logits: torch.Tensor) -> torch.Tensor:
    """log of the views' mean probabilities at T 1 (images, classes), from each view's
    logits (images, views, classes): for one view, its log-softmax."""
    views = view_logits.shape[1]
    return torch.logsumexp(torch.log_softmax(view_logits.float(), -1), 1) - np.log(views)


def view_probabilities(view_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated probabilities (images, classes) from each view's logits (images, views,
    classes): the views' probabilities at T 1 averaged, then the mean calibrated, softmax(
    log(mean) / T), which for one view is softmax(z / T). Calibrating the mean, rather
    than averaging calibrated views, leaves the answer where T 1 puts it with --tta too
    (the top class, and a taxonomy's branch, `Taxonomy.predict`): averaged calibrated
    views moved 15 of 160 taxonomy answers at T 0.25, and flat ones too."""
    return torch.softmax(view_log_mean(view_logits) / temperature, -1)


class Predictor:
    """A loaded bundle with its preprocessing, precision policy and calibration. With a
    `fabric` (a distributed predict) it runs on that process's device, and rank 0 chooses
    the engine for all."""

    def __init__(self, model: str | Path, device: str = "auto", precision: str = "auto",
                 batch_size: int = BATCH_SIZE, workers: int | None = None, runtime: str = "auto",
                 progress: bool = False, fabric=None, unknown_score: str | None = None,
                 images: int | None = None):
        """`images`: how many images this predictor is for, where known (a few are run in
        PyTorch fp32 rather than after timing the engines: `Policy.choose_frozen`)."""
        check_default_dtype()
        per_machine = getattr(fabric.strategy, "num_processes", 1) if fabric else 1
        self.workers = check_reading(batch_size, workers, per_machine)
        self.bundle = find_bundle(model)
        self.model, self.manifest, self.unknown = load_bundle(self.bundle, with_unknown=True)
        if unknown_score and self.unknown is None:
            raise WingspanError(f"The model {self.bundle} has no unknown scores.",
                                hint="A model trained before they existed: fit them with "
                                "`wingspan calibrate RUN --unknown` on its run folder.")
        # The score this predictor uses (the bundle's default unless another is asked for).
        self.unknown_score = (self.unknown.check_score(unknown_score or self.unknown.score)
                              if self.unknown else None)
        self.level = list(self.manifest["classes"])[-1]
        self.classes: list[str] = self.manifest["classes"][self.level]
        self.temperature = float(self.manifest.get("calibration", {}).get("temperature", 1.0))
        taxonomy = self.manifest.get("taxonomy")
        self.taxonomy = Taxonomy.from_dict(taxonomy) if taxonomy else None
        self.rare: dict[str, str] = self.manifest.get("training", {}).get("rare_classes") or {}
        pre = self.manifest["preprocessing"]
        self.size = int(pre["input_size"])
        main = fabric is None or fabric.is_global_zero
        # (a lossy engine that moved this model's answers at the end of its training is
        # left out: its predictions then match the fp32 export's)
        inference = self.manifest.get("inference")
        policy = dataclasses.replace(resolve_policy(  # (no training step: not described)
            str(fabric.device) if fabric else device, precision, runtime=runtime,
            avoid=avoided_engines(inference)), train=None)
        policy.prepare_model(self.model)
        chosen = (policy.choose_frozen(self.model, self.size, batch_size, progress=progress,
                                       job_images=images) if main else None)
        if fabric is not None and fabric.world_size > 1:
            records = fabric.broadcast(chosen.records() if chosen else None)
            chosen = chosen or policy.adopt(records, "as rank 0 chose")
        checked = (inference or {}).get("lossy_engines") or {}
        self.policy = dataclasses.replace(chosen, unchecked=(
            chosen.frozen.engine.precision != "fp32" and chosen.frozen.engine.name not in checked
            and "forced" not in chosen.frozen.how))
        self.batch_size = batch_size
        self.config = AugmentConfig(image_size=self.size, eval_crop=float(pre["crop_pct"]))
        self.norm = {"mean": tuple(pre["mean"]), "std": tuple(pre["std"]),
                     "interpolation": pre["interpolation"]}
        self.images_per_second = 0.0
        # The backbone runs on the chosen engine; the small head, in fp32 PyTorch, also
        # gives the unknown scores their features.
        self.extract = self.policy.runner(self.model.feature_extractor(), self.size)
        self._head_device = next(self.model.head.parameters()).device

    def heads(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled features -> float32 logits per level, on the CPU."""
        with torch.inference_mode():
            out = self.model.head(features.to(self._head_device).float())
        return {lv: v.float().cpu() for lv, v in out.items()}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preprocessed images -> logits per level (float32, CPU)."""
        return self.heads(self.extract(images))

    def forward_with_scores(self, images: torch.Tensor):
        """Preprocessed images -> (logits per level, unknown scores per level or None)."""
        feats = self.extract(images).float()
        outputs = self.heads(feats)
        return outputs, self.unknown_scores(feats, outputs)

    @property
    def thresholds(self) -> dict[str, float] | None:
        """Each level's unknown threshold for the score in use."""
        return self.unknown.thresholds[self.unknown_score] if self.unknown else None

    def unknown_scores(self, features: torch.Tensor, logits: dict[str, torch.Tensor],
                       branch_logits: torch.Tensor | None = None
                       ) -> dict[str, np.ndarray] | None:
        """Per level, each image's unknown score (None for a bundle without scores);
        `branch_logits`: see `UnknownDetector.scores`."""
        if self.unknown is None:
            return None
        return self.unknown.scores(features, logits, self.unknown_score,
                                   branch_logits=branch_logits)

    @property
    def merged(self) -> set[str]:
        """The classes `--rare-below` made of rare species, each named after their genus."""
        return set(self.rare.values())

    def known_level(self, scores: dict[str, float] | None) -> str | None:
        """The finest level an image's scores pass (all levels when there are none)."""
        if scores is None:
            return self.level
        return deepest_known(self.model.levels, scores, self.thresholds)

    @property
    def draft(self) -> int:
        """The shorter side a JPEG must keep when decoded reduced (see `open_rgb`): the
        resize before the centre crop."""
        return round(self.size / self.config.eval_crop)

    def views(self, tta: bool) -> list[v2.Transform]:
        """The evaluation view; with TTA also its mirror image and a less cropped view."""
        clean = eval_transform(self.config, **self.norm)
        if not tta:
            return [clean]
        wide = eval_transform(AugmentConfig(image_size=self.size, eval_crop=1.0), **self.norm)
        flip = v2.RandomHorizontalFlip(p=1.0)
        return [clean, v2.Compose([clean, flip]), wide, v2.Compose([wide, flip])]

    @torch.inference_mode()
    def run(self, paths: Sequence[str], tta: bool = False, progress: bool = True,
            every_score: bool = False, with_features: bool = False) -> Iterator[Prediction]:
        """Predictions for each path, in order, a batch at a time (memory stays flat). With
        `every_score`, each prediction also holds every unknown score of the finest level
        (to compare them); with `with_features`, its pooled features."""
        views = self.views(tta)
        # One batch: workers would only add their start (0.13 s: a loop predicting a photo
        # at a time paid it for each), with no next batch to read while this one runs.
        workers = self.workers if len(paths) > self.batch_size else 0
        workers = room_for_workers(workers, self.batch_size, self.size, len(views))
        loader = Loader(_Images(paths, views, self.size, self.draft),
                        batch_size=self.batch_size, num_workers=workers,
                        generator=torch.Generator(),
                        pin_memory=self.policy.device.type == "cuda")
        start, done, i = time.perf_counter(), 0, 0
        # (counted in batches: said so, for the plain lines a log gets)
        for x, errors in track(loader, f"Predicting {counted(len(paths), 'image')}, batches of "
                               f"{self.batch_size}", total=len(loader), enabled=progress):
            n, k = x.shape[:2]
            feats = self.extract(x.flatten(0, 1)).float()
            outputs = self.heads(feats)
            logits = outputs[self.level].view(n, k, -1)
            # With TTA, the views' mean features and logits are scored; a taxonomy's MSP
            # on the views' mean probabilities, as the answer's branch is chosen on them
            # (on the mean logits it rated another branch's class for 2 of 80 images).
            mean_feats = feats.view(n, k, -1).mean(1)
            mean_outputs = {lv: o.view(n, k, -1).mean(1) for lv, o in outputs.items()}
            log_mean = view_log_mean(logits)
            branch_logits = log_mean if k > 1 else None
            unknown = self.unknown_scores(mean_feats, mean_outputs, branch_logits)
            every = (self.unknown.scores(mean_feats, mean_outputs, every=True,
                                         branch_logits=branch_logits)
                     if every_score and self.unknown else None)
            probs = torch.softmax(log_mean / self.temperature, -1).numpy()
            mean_logits = logits.mean(1).numpy()
            heads = {lv: torch.softmax(o.float().cpu().view(n, k, -1), -1).mean(1).numpy()
                     for lv, o in outputs.items() if lv != self.level}
            for j in range(n):
                if errors[j]:
                    yield Prediction(paths[i], None, None, errors[j])
                else:
                    scores = ({lv: float(u[j]) for lv, u in unknown.items()}
                              if unknown else None)
                    yield Prediction(paths[i], probs[j], mean_logits[j],
                                     heads={lv: h[j] for lv, h in heads.items()} or None,
                                     unknown=scores, known_level=self.known_level(scores),
                                     every_score={name: float(v[self.level][j])
                                                  for name, v in every.items()}
                                     if every else None,
                                     features=mean_feats[j].numpy() if with_features else None,
                                     view_logits=logits[j].numpy())
                i += 1
            done += sum(not e for e in errors)  # images read and predicted, not failures
        self.images_per_second = done / max(time.perf_counter() - start, 1e-9)
