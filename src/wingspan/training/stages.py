"""The two stages of the recipe, each a plain loop one can read top to bottom.

Stage 1 trains the head on a frozen backbone. The backbone's output for an image then
depends on the image alone, so by default it runs once per view (a clean view plus K
augmented ones) and the head trains on those cached features for as many epochs as it
needs. Stage 2 unfreezes the last stages and trains end to end.

In a distributed run (see `wingspan.parallel`) each rank computes its shard of the feature
cache and of every validation pass, and the shards are gathered; the head trains on all
features on every rank; fine-tuning runs under DDP on each rank's slice of every batch.
"""

from __future__ import annotations

import json
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from wingspan.config import TrainConfig
from wingspan.errors import WingspanError, counted, some, stop_if_signalled
from wingspan.evaluate.metrics import macro_f1
from wingspan.files import atomic_path, file_stamp
from wingspan.models.engine import own_random_stream
from wingspan.models.runtime import keep_only_session
from wingspan.parallel import every_rank, gather_objects, gather_shards, shard
from wingspan.progress import Bar, track
from wingspan.training.context import Run
from wingspan.training.data import (
    FINETUNE_VIEW,
    HEAD_DROPOUT,
    REPEAT_VIEW_CHOICE,
    REPEAT_VIEWS,
    VIEW_CHOICE,
    EpochBatches,
    LabelledImages,
    epoch_order,
    fixed_batches,
    item_seed,
    make_loader,
    repeat_counts,
)
from wingspan.training.finetune_engine import finetune_parts, prefixed_pass
from wingspan.training.folder import feature_cache_file, last_checkpoint
from wingspan.training.prepare import Weighting, balance
from wingspan.training.schedule import StageSchedule, make_optimizer
from wingspan.training.shared_features import SharedFeatures

# In a distributed run, how often (in steps) rank 0 is asked whether a checkpoint is due.
CHECKPOINT_POLL_STEPS = 20


class Criterion:
    """Cross-entropy per trained level (class-weighted, label-smoothed), summed with the
    level weights. Labels are (N, levels), one column per level.

    A class-weighted mean divides by the summed weights of the batch's labels. Given a
    `fabric` of several processes (fine-tuning under DDP) that sum is taken over the global
    batch, so that DDP's average of the ranks' gradients is exactly one process's."""

    def __init__(self, run: Run, device: torch.device, fabric=None,
                 weights: Weighting | None = None):
        self.levels = run.data.levels
        self.weights = run.data.level_weights
        loss = (weights or weighting(run)).loss
        self.class_weights = {lv: _to(loss[lv], device) for lv in self.levels}
        self.smoothing = run.config.label_smoothing
        self.fabric = fabric if fabric is not None and fabric.world_size > 1 else None

    def __call__(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        total = sum(self.weights[lv] * self._level(outputs[lv].float(), labels[:, i], lv)
                    for i, lv in enumerate(self.levels))
        return total / sum(self.weights.values())

    def _level(self, logits: torch.Tensor, y: torch.Tensor, level: str) -> torch.Tensor:
        w = self.class_weights[level]
        # Each image's whole smoothed loss weighed by its own class's weight, as Keras'
        # class_weight does: torch's weight= also weighs the smoothing's term for every
        # other class by that class's weight, which pulled every image toward the rare
        # classes (at label smoothing 0.3 on 15x imbalance, training collapsed).
        per_image = nn.functional.cross_entropy(logits, y, reduction="none",
                                                label_smoothing=self.smoothing)
        summed = (per_image * w[y]).sum() if w is not None else per_image.sum()
        norm = w[y].sum() if w is not None else torch.tensor(float(len(y)), device=y.device)
        if self.fabric is not None:  # the global batch's, shared out over the ranks
            # torch's collective, queued on the device: Fabric's all_reduce adds a barrier,
            # which would stall the host every step.
            norm = norm.detach().clone()
            torch.distributed.all_reduce(norm)
            norm = norm / self.fabric.world_size
        return summed / norm.clamp_min(1e-12)  # 0 / 0 for a batch with nothing readable


def loss_fn(run: Run, device: torch.device | None = None, fabric=None,
            weights: Weighting | None = None) -> Criterion:
    """The training loss, its class weights on `device` (default: the run's); `fabric`
    normalises over a distributed global batch; `weights`: the epoch's (default: those of
    the training images not known to be unreadable now)."""
    return Criterion(run, device or run.device, fabric, weights)


def weighting(run: Run, readable: torch.Tensor | None = None) -> Weighting:
    """The loss's class weights and the weighted sampler's image weights (prepare.balance),
    counted on the `readable` training images (default: those not known to be unreadable
    now)."""
    data = run.data
    if readable is None:
        if not run.state.skipped:
            return Weighting(data.class_weights, data.sample_weights)
        readable = run.readable(data.train)
    if bool(readable.all()):
        return Weighting(data.class_weights, data.sample_weights)
    weights = balance(data.train.labels, readable, data.levels, data.level_classes,
                      run.config)
    _note_weighting(run, {lv: w is not None for lv, w in weights.loss.items()},
                    int((~readable).sum()))
    return weights


def _note_weighting(run: Run, use: dict[str, bool], unreadable: int) -> None:
    """One train.log line when the readable images turn `auto`'s class weighting on or off
    for a level: the line at the start counted every image."""
    said = run.state.loss_weighted or {lv: w is not None
                                       for lv, w in run.data.class_weights.items()}
    changed = [lv for lv in run.data.levels if use[lv] != said[lv]]
    if changed:
        now = ", ".join((f"{lv} " if len(run.data.levels) > 1 else "")
                        + ("on" if use[lv] else "off") for lv in changed)
        run.log(f"Class-weighted loss now {now}: without the "
                f"{counted(unreadable, 'unreadable training image')} the largest-to-smallest "
                f"class ratio moved across imbalance_threshold "
                f"({run.config.imbalance_threshold:g}).")
    run.state.loss_weighted = use


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device, non_blocking=True)


def _logits(run: Run, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The finest level's logits: what the model predicts from."""
    return outputs[run.data.level].float()


def _answered(run: Run, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The finest class predict would answer: the top class, or with a taxonomy the top-down
    branch's (Taxonomy.answer), so that the epoch kept is chosen on the figure reported.
    The branch is taken at temperature 1, as predict takes it whatever the temperature.
    Training's own figures (train_acc, train_macro_f1) use it too, so that a taxonomy run's
    curves compare train and val on one answer."""
    logits = _logits(run, outputs).detach()
    if run.data.taxonomy is None:
        return logits.argmax(1)
    return torch.from_numpy(run.data.taxonomy.answer(logits.softmax(1).cpu().numpy(),
                                                     temperature=1.0))


# --- evaluation -------------------------------------------------------------------------

@torch.inference_mode()
def evaluate_features(run: Run, features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Scores of the head on cached features (every rank holds all of them), leaving out
    the images that could not be read."""
    read = run.readable(run.data.val)
    if not read.any():
        raise _no_val_read(run)
    features, labels = features[read], labels[read]
    run.model.head.eval()
    outputs = [_head_in_fp32(run, features[i:i + 1024]) for i in range(0, len(features), 1024)]
    return _scores(run, _concat(outputs), labels)


@torch.inference_mode()
def evaluate_images(run: Run, images: LabelledImages, forward=None) -> dict:
    """Scores of the model on `images` (the val split): each rank runs its shard, and the
    outputs are gathered, so every rank scores the whole split. `forward`: images ->
    {level: logits, ...} for the pass (fine-tuning's prefix and rest), else one is made."""
    run.model.eval()
    mine = shard(len(images), run.fabric)
    if forward is None:
        # The weights change after this pass: an ONNX export only where it pays for itself.
        # The features too, so the final pass can reuse the graph (run._final_pass).
        module, names = run.model.with_features()
        forward = run.policy.runner(module, run.image_size, names, once=len(mine))
    if "val" not in run.loaders:  # one loader for every validation pass (its workers stay)
        batches = fixed_batches(mine, run.config.batch_size)
        run.loaders["val"] = make_loader(images, batches, run.workers, persistent=True,
                                         pin=run.device.type == "cuda")
    row = {item: k for k, item in enumerate(mine)}
    parts = {lv: torch.zeros(len(mine), n) for lv, n in run.model.head.config.outputs.items()}
    read = torch.zeros(len(mine), dtype=torch.uint8)
    for x, _, index, failed in run.loaders["val"]:
        run.note_unreadable(failed)
        if len(index):
            rows = torch.tensor([row[int(i)] for i in index])
            out = _head_in_fp32(run, forward(x)["features"])
            for lv, part in parts.items():
                part[rows] = out[lv]
            read[rows] = 1
    run.share_unreadable()
    read = gather_shards(run.fabric, read, len(images)).bool()
    everything = {lv: gather_shards(run.fabric, o, len(images))[read] for lv, o in parts.items()}
    return _scores(run, everything, images.labels[read])


def _head_in_fp32(run: Run, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """{level: logits} of the head on a pass's features, in fp32 outside autocast, as the
    head stage's epochs are scored and as predict answers: the pass ran it in its own
    precision (bf16 moved the top class of about 1% of close calls), and fine-tuning's
    epochs were chosen on other logits than those the model then answers with."""
    with torch.autocast(run.device.type, enabled=False):
        out = run.model.head(features.to(run.device).float())
    return {lv: o.float().cpu() for lv, o in out.items()}


def _concat(outputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {lv: torch.cat([o[lv] for o in outputs]) for lv in outputs[0]}


def _no_val_read(run: Run) -> WingspanError:
    return WingspanError("No validation image could be read: no epoch could be scored or "
                         "chosen.",
                         hint=f"Mend or remove the unreadable files listed in "
                              f"{run.dir / 'train.log'}, then train again.", every_rank=True)


def _scores(run: Run, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict:
    if not len(labels):
        raise _no_val_read(run)
    preds, truth = _answered(run, outputs), labels[:, -1]
    return {"loss": float(loss_fn(run, torch.device("cpu"))(outputs, labels)),
            "acc": float((preds == truth).float().mean()),
            "macro_f1": epoch_f1(truth.numpy(), preds.numpy())}


def epoch_f1(truth, preds) -> float:
    """The val macro-F1 an epoch is chosen on: over the classes val holds. A class val lacks
    has no F1 to give: averaged in (scikit-learn's union of truth and answers) a single val
    image called by its name added an F1 of 0, so the epochs chosen were those that never
    named the rare classes val lacks (0.600 against 0.829 for one mistake of six)."""
    return macro_f1(truth, preds, truth_only=True)


# --- stage 1: the head on a frozen backbone ----------------------------------------------

@torch.inference_mode()
def extract_features(run: Run, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of every training image (clean view + `views` augmented ones) and
    of every validation image, on the CPU; kept in the run so a resumed run does not redo
    them. Each rank computes every world_size-th image, and the shards are gathered."""
    path = feature_cache_file(run.dir)
    n, m = len(run.data.train), len(run.data.val)
    stamps = image_stamps(run.data.train.paths + run.data.val.paths)  # before any is read
    cached = None
    if path.is_file():
        try:
            saved = load_file(path)
            if (saved["train"].shape[:2] == (n, views + 1) and len(saved["val"]) == m
                    and same_images(run, saved.get("stamps"), stamps)):
                with safe_open(path, "pt") as f:  # what could not be read, as it was cached
                    unreadable = json.loads((f.metadata() or {}).get("unreadable", "{}"))
                cached = saved["train"], saved["val"]
        except Exception as e:  # noqa: BLE001 - a damaged cache file is only redone
            run.log(f"The feature cache {path} cannot be read ({type(e).__name__}); "
                    "computing it again")
    # Used by all ranks or none (each read it for itself; runs/ on a disk a machine of a
    # multi-node run does not share is computed again).
    if every_rank(run.fabric, cached is not None):
        run.note_unreadable(list(unreadable.items()))
        run.share_unreadable()  # (--strict under DDP stops every rank here)
        return cached
    start = time.perf_counter()  # the export (if any) counts as part of the cache pass
    run.model.eval()
    features = run.policy.runner(run.model.feature_extractor(), run.image_size)
    width, world = run.model.backbone.num_features, run.fabric.world_size
    train, val = torch.zeros(n, views + 1, width), torch.zeros(m, width)
    # (images, view, destination): view 0 is the clean view, 1..K augmented ones.
    jobs = [(run.data.train_clean, 0, train[:, 0])]
    jobs += [(run.data.train, v, train[:, v]) for v in range(1, views + 1)]
    jobs += [(run.data.val, 0, val)]
    store, reused = SharedFeatures.for_run(run), 0  # what earlier runs computed
    with Bar(n * (views + 1) + m, "Caching backbone features", run.show_progress) as bar:
        for images, view, out in jobs:
            mine = shard(len(images), run.fabric)
            part = torch.empty(len(mine), width)
            todo, entries = list(mine), {}
            if store:  # (about 0.2 ms an image: 16 s at ETHEC's size, so on the bar)
                todo, entries = [], store.entries(images, mine, view)
                for i in mine:
                    if (kept := store.get(entries[i])) is None:
                        todo.append(i)
                    else:
                        part[(i - run.fabric.global_rank) // world] = kept
                        bar.advance(world)
                reused += len(mine) - len(todo)
            loader = make_loader(images, fixed_batches(todo, run.config.batch_size, view),
                                 run.workers if todo else 0, pin=run.device.type == "cuda")
            for x, _, idx, failed in loader:
                run.note_unreadable(failed)
                if len(idx):
                    computed = features(x)
                    part[(idx - run.fabric.global_rank) // world] = computed
                    for i, f in zip(idx.tolist(), computed, strict=True) if store else ():
                        store.put(entries[i], f)
                bar.advance((len(idx) + len(failed)) * world)
            out.copy_(gather_shards(run.fabric, part, len(images)))
    run.share_unreadable()
    reused = sum(r for counts in gather_objects(run.fabric, [reused]) for r in counts)
    seconds = time.perf_counter() - start
    run.state.stage_seconds["head"] = run.state.stage_seconds.get("head", 0.0) + seconds
    run.timing("head", "feature_cache", seconds)
    # Of the images read: unreadable ones have no features (and are listed above).
    n, m = int(run.readable(run.data.train).sum()), int(run.readable(run.data.val).sum())
    computed = n * (views + 1) + m - reused
    rate = f"{computed / seconds:.1f} images/s" + (f" over {world} processes" if world > 1
                                                   else "")
    if reused:  # (by an earlier run, or by this one before it was stopped)
        rate = (f"{reused} of them computed before and read from {store.arrays.directory}"
                + (f"; {rate} for the other {computed}" if computed else ""))
    elif store:  # (a rerun that reads none says why: the engine is timed again on a busy
        # machine, and another engine's features are other features)
        rate += (f"; kept in {store.arrays.directory} for later runs with the same weights, "
                 f"engine ({run.policy.frozen.engine.name}) and augmentation")
    run.log(f"Cached features of {n} training images x {views + 1} views and {m} validation "
            f"images in {seconds:.1f}s ({rate})")
    if run.is_main:  # a kill leaves no half-written cache
        with atomic_path(path) as tmp:
            save_file({"train": train.contiguous(), "val": val.contiguous(),
                       "stamps": stamps}, tmp,
                      metadata={"unreadable": json.dumps(run.state.skipped)})
    return train, val


def image_stamps(paths: list[str]) -> torch.Tensor:
    """Each file's files.file_stamp as it is now (-1s for a file that is gone)."""
    rows = []
    for p in paths:
        try:
            rows.append(file_stamp(p))
        except OSError:
            rows.append((-1, -1, -1))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(paths), 3)


def same_images(run: Run, saved: torch.Tensor | None, now: torch.Tensor) -> bool:
    """Are the cached features of the images as they are now? An image edited between a
    kill and the resume must not keep its old features; one gone since is left out as
    unreadable (its features are never used), so it does not count."""
    if saved is None or saved.shape != now.shape:  # a cache of an older wingspan
        run.log("The feature cache does not say which images it holds; computing it again")
        return False
    changed = ((saved != now).any(1) & (now[:, 0] >= 0)).nonzero().flatten()
    if len(changed):
        paths = run.data.train.paths + run.data.val.paths
        run.log(f"Computing the feature cache again: {counted(len(changed), 'image')} changed "
                f"since it was made (e.g. {paths[int(changed[0])]})")
    return not len(changed)


def every_class_readable(run: Run) -> torch.Tensor:
    """The mask of training images not known to be unreadable, once every class has one:
    a class whose every image is broken would be an output the model never learns."""
    readable = run.readable(run.data.train)
    if not readable.any():
        raise WingspanError("No training image could be read.",
                            hint=f"See the files listed in {run.dir / 'train.log'}.",
                            every_rank=True)
    read = set(run.data.train.labels[readable, -1].tolist())
    lost = [c for i, c in enumerate(run.data.classes) if i not in read]
    if lost:
        raise WingspanError(f"No training image of {', '.join(map(repr, lost[:5]))} could "
                            "be read: the model would "
                            "have a class it never learns.",
                            hint=f"Mend or remove its images (the files are listed in "
                                 f"{run.dir / 'train.log'}), or leave the class out of the "
                                 "data, then train again.", every_rank=True)
    say_what_is_read(run, readable)
    return readable


def say_what_is_read(run: Run, readable: torch.Tensor | None = None) -> None:
    """One train.log line each time more images are known to be unreadable: the counts said
    at the start were of the files listed, before any was read. `readable`: the training
    images' mask, if known."""
    read = readable if readable is not None else run.readable(run.data.train)
    read_val = run.readable(run.data.val)
    unreadable = [int((~read).sum()), int((~read_val).sum())]
    if unreadable == (run.state.unreadable_said or [0, 0]):
        return
    run.state.unreadable_said = unreadable
    parts = [f"{what} on {int(mask.sum())} of the {len(mask)} {split} images"
             for what, split, mask, k in (("training", "training", read, unreadable[0]),
                                          ("validating", "validation", read_val, unreadable[1]))
             if k]
    run.log(f"{' and '.join(parts).capitalize()} (left out: "
            f"{counted(sum(unreadable), 'unreadable image')}, listed above and in "
            "metrics.json)")


def train_head(run: Run) -> None:
    """Stage 1. The backbone is frozen; only the head's parameters get an optimizer. It
    trains in fp32 on the run's device, on every rank alike (the head is small; rank 0's
    weights are also copied to the others after each epoch, as a GPU's kernels need not
    be bit-reproducible)."""
    config, state, device = run.config, run.state, run.device
    run.model.backbone.freeze()
    head = run.model.head
    labels = run.data.train.labels
    n = len(labels)
    cached = config.feature_cache
    if cached:  # (which reads every image: those it cannot are known from here on)
        train_feats, val_feats = extract_features(run, config.feature_views)
    else:  # the backbone's weights stay frozen, so one runner serves the whole stage
        start = time.perf_counter()
        frozen = run.policy.runner(run.model.feature_extractor(), run.image_size)
        _add_seconds(run, "head", time.perf_counter() - start)
    optimizer = make_optimizer(head, config.lr, config.weight_decay, name=config.optimizer)
    # An epoch's order holds the readable images (a weighted draw, as many)
    readable = int(run.readable(run.data.train).sum())
    schedule = _schedule(run, optimizer, -(-readable // config.batch_size),
                         config.epochs_head, 0.0)
    run.restore_optimizer(optimizer)
    schedule.at(state.epoch, 0, 1)
    # A checkpoint after an epoch once checkpoint_minutes have passed, and at the stage's
    # end: on cached features an epoch may take milliseconds, the whole model's
    # checkpoint a second (keep_best).
    last_save, saved = time.perf_counter(), True
    for epoch in _epochs_left(run, config.epochs_head):
        start = time.perf_counter()
        readable = every_class_readable(run)
        balance = weighting(run, readable)  # of the images it can read
        criterion = loss_fn(run, weights=balance)
        order = [i for i in epoch_order(n, config.seed, epoch, balance.sample) if readable[i]]
        views, repeats = _epoch_views(config, n, order, epoch)
        head.train()
        loss_sum, preds = 0.0, []
        seen, steps = [], -(-len(order) // config.batch_size)
        # Every rank trains the whole head on the same features: its dropout masks are
        # drawn alike on each, from the epoch's own seed (so a resumed epoch draws them
        # again), and the ranks' heads stay equal step by step, not just at the sync.
        with own_random_stream(device):
            torch.manual_seed(item_seed(config.seed, epoch, HEAD_DROPOUT))
            for step, b in enumerate(range(0, len(order), config.batch_size)):
                t0 = time.perf_counter()
                idx = torch.tensor(order[b:b + config.batch_size], dtype=torch.long)
                place = views[b:b + config.batch_size]
                if cached:
                    feats = train_feats[idx, place]
                else:
                    feats, read = _frozen_features(run, frozen, idx, place, epoch,
                                                   repeats[b:b + config.batch_size])
                    feats, idx = feats[read], idx[read]
                    if not len(idx):
                        continue
                t1 = time.perf_counter()
                outputs = head(feats.to(device, non_blocking=True))
                loss = criterion(outputs, labels[idx].to(device, non_blocking=True))
                t2 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                _stop_if_diverged(run, "head", epoch, step)
                schedule.at(epoch, step + 1, steps)
                loss_sum += loss.item() * len(idx)
                seen.append(idx)
                preds.append(_answered(run, outputs).cpu())  # a weighted draw repeats images
                _account(run, "head", t0, t1, t2, len(idx))
        _sync_from_rank_zero(run, head)
        run.share_unreadable()  # (without the cache each rank read its own shard)
        if not seen:
            raise WingspanError("No training image could be read.",
                                hint=f"See the files listed in {run.dir / 'train.log'}.")
        seen_idx = torch.cat(seen)
        t0 = time.perf_counter()
        val = (evaluate_features(run, val_feats, run.data.val.labels) if cached
               else evaluate_images(run, run.data.val))
        run.timing("head", "eval", time.perf_counter() - t0)
        # (without the cache an epoch runs the backbone on every image: checkpointed each)
        saved = not cached or _checkpoint_due(run, last_save, 0)
        _end_epoch(run, "head", epoch, loss_sum / len(seen_idx), labels[seen_idx, -1],
                   torch.cat(preds), val, optimizer, len(seen_idx), time.perf_counter() - start,
                   checkpoint=saved)
        last_save = time.perf_counter() if saved else last_save
        if state.bad_epochs >= config.patience and epoch + 1 < config.epochs_head:
            run.log(f"Head stage stopped early: no better val macro-F1 (or val loss at an "
                    f"equal one) in {config.patience} epochs")
            break
    if not saved:
        run.save(optimizer)


def _epoch_views(config: TrainConfig, n: int, order: list[int], epoch: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The view (0 clean, 1.. augmented) each place of the head stage's epoch `order` reads,
    and how many times its image came before in the epoch. An image drawn again (the
    weighted sampler) draws its view again, not the same cached one each time."""
    g = torch.Generator().manual_seed(item_seed(config.seed, epoch, VIEW_CHOICE))
    views = torch.randint(0, config.feature_views + 1, (n,), generator=g)
    views = views[torch.tensor(order, dtype=torch.long)]
    repeats = torch.tensor(repeat_counts(order), dtype=torch.long)
    again = repeats > 0
    if again.any():
        g = torch.Generator().manual_seed(item_seed(config.seed, epoch, REPEAT_VIEW_CHOICE))
        views = torch.where(again, torch.randint(0, config.feature_views + 1,
                                                 (len(order),), generator=g), views)
    return views, repeats


def _schedule(run: Run, optimizer, steps_per_epoch: int, epochs: int,
              warmup_fraction: float) -> StageSchedule:
    """The stage's schedule, sized by its first epoch's batches; a resumed run's as it was
    sized then (more images may have been found unreadable since, or gone)."""
    run.state.steps_per_epoch = run.state.steps_per_epoch or steps_per_epoch
    return StageSchedule(optimizer, run.state.steps_per_epoch, epochs, warmup_fraction)


def _epochs_left(run: Run, epochs: int) -> range:
    """The stage's epochs still to train: none once it has stopped early, which a run killed
    after that epoch's checkpoint, before the next stage began, resumes at."""
    state = run.state
    return range(state.epoch, state.epoch if state.bad_epochs >= run.config.patience else epochs)


def _frozen_features(run: Run, frozen, idx: torch.Tensor, views: torch.Tensor, epoch: int,
                     repeats: torch.Tensor):
    """Without the cache: run the frozen backbone on this batch (clean or augmented), each
    rank on its shard of it; an image's k-th repeat in the epoch (`repeats`) augmented
    afresh, as fine-tuning's are. Returns the features and which images could be read."""
    mine = shard(len(idx), run.fabric)
    with torch.inference_mode():
        items = [run.data.train_clean[(int(idx[j]), 0, 0)] if views[j] == 0
                 else run.data.train[(int(idx[j]), epoch, 1 + REPEAT_VIEWS * int(repeats[j]))]
                 for j in mine]
        run.note_unreadable([(run.data.train.paths[i], why) for x, _, i, why in items if why])
        read = torch.tensor([item[0] is not None for item in items], dtype=torch.uint8)
        part = torch.zeros(len(items), run.model.backbone.num_features)
        if read.any():
            part[read.bool()] = frozen(torch.stack([it[0] for it in items if it[0] is not None]))
        features = gather_shards(run.fabric, part, len(idx))
        read = gather_shards(run.fabric, read, len(idx)).bool()
    # A normal tensor (the head may save it for its backward); which rows could be read.
    return features.clone(), read


@torch.no_grad()
def _sync_from_rank_zero(run: Run, module: nn.Module) -> None:
    """Copy rank 0's weights to every rank (GPU kernels need not be bit-reproducible)."""
    if run.fabric.world_size > 1:
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)


# --- stage 2: fine-tune the last stages --------------------------------------------------

def finetune(run: Run) -> None:
    """Stage 2, under Lightning Fabric: the training step's precision (autocast, and a grad
    scaler for fp16) and, in a distributed run, DDP over each rank's slice of the batch."""
    config, state, fabric = run.config, run.state, run.fabric
    n_stages = config.stages_to_unfreeze(run.model.spec.unfreeze)
    stages = run.model.backbone.unfreeze_last(n_stages)
    top_lr = config.lr * config.finetune_lr_scale
    optimizer = make_optimizer(run.model, top_lr, config.weight_decay, config.layer_decay,
                               config.optimizer)
    batches = EpochBatches(len(run.data.train), config.batch_size, config.seed,
                           view=FINETUNE_VIEW,
                           rank=fabric.global_rank, world=fabric.world_size)
    _leave_out_unreadable(run, batches)
    schedule = _schedule(run, optimizer, len(batches), config.epochs_finetune,
                         config.warmup_fraction)
    run.restore_optimizer(optimizer)
    schedule.at(state.epoch, state.step, len(batches))  # (the resumed epoch's batches)
    if state.epoch == 0 and state.step == 0:
        _say_what_finetunes(run, stages, n_stages, top_lr)
    start = time.perf_counter()
    prefix, trained = finetune_parts(run.model, run.policy, run.image_size)
    # Stage 1's session (the whole backbone, whose weights change from here on) is never
    # run again; its activations' memory would stay through fine-tuning (+1 GB at 224 px).
    keep_only_session(prefix)
    # Validation reuses the prefix's runner (frozen weights: no export per epoch) and runs
    # the rest in the training step's precision.
    validate = (prefixed_pass(prefix, trained, run.policy, run.policy.train_dtype)
                if prefix is not None else None)
    if config.compile:
        trained = torch.compile(trained)
    trained, optimizer = fabric.setup(trained, optimizer)
    _add_seconds(run, "finetune", time.perf_counter() - start)
    loader = make_loader(run.data.train, batches, run.workers, persistent=True,
                         pin=run.device.type == "cuda")
    for epoch in _epochs_left(run, config.epochs_finetune):
        # Rank 0 carries the running sums of an epoch interrupted and resumed.
        partial = ((run.is_main and state.partial)
                   or {"loss_sum": 0.0, "labels": [], "preds": [], "seconds": 0.0})
        start, last_save = time.perf_counter(), time.perf_counter()
        # Weights of the images the epoch's order holds (a resumed epoch's too)
        criterion = loss_fn(run, fabric=fabric, weights=_leave_out_unreadable(run, batches))
        batches.set_epoch(epoch, state.step)
        steps = state.step + len(batches)  # the epoch's, with those a resumed run did
        run.model.train()  # through Backbone.train, which keeps frozen BatchNorm frozen
        bar = track(loader, f"Fine-tune epoch {epoch + 1}/{config.epochs_finetune}",
                    total=len(loader), enabled=run.show_progress)
        profiler = _Profiler(run) if config.profile and epoch == 0 and run.is_main else None
        preds = []  # on the device until the epoch ends or a checkpoint needs them
        t0 = time.perf_counter()
        for x, y, _, failed in bar:
            t1 = time.perf_counter()  # t1 - t0: waiting for the loader
            run.note_unreadable(failed)
            if not len(y) and fabric.world_size == 1:  # nothing readable in this batch
                state.step += 1  # its place in the epoch is passed all the same
                t0 = time.perf_counter()
                continue
            if prefix is not None:
                x = prefix(x)
            labels, (items, mine) = y, batches.real(state.step)
            x, y = run.policy.prepare_batch(x), y.to(run.device, non_blocking=True)
            outputs = trained(x)
            loss = criterion(outputs, y)
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            _stop_if_diverged(run, "finetune", epoch, state.step)
            state.step += 1
            schedule.at(epoch, state.step, steps)
            _account(run, "finetune", t0, t1, t2, len(y) * fabric.world_size)
            if profiler:
                profiler = profiler.step()
            # The epoch's figures as one process's: each rank's loss is its share of the
            # global batch's mean (its slices may differ by one), and a padding copy of a
            # last batch smaller than the ranks is left out. (A first epoch's unreadable
            # images count in `items` on several ranks: its train loss is near, not exact.)
            share = len(y) if fabric.world_size == 1 else items / fabric.world_size
            partial["loss_sum"] += loss.item() * share  # (the device was waited for above)
            partial["labels"] += labels[:mine, -1].tolist()
            preds.append(_answered(run, outputs)[:mine])  # (a taxonomy's branch: on the CPU)
            if _checkpoint_due(run, last_save, state.step):
                partial["preds"] += torch.cat(preds).tolist()
                preds = []
                state.partial = {**_merge(run, partial),
                                 "seconds": partial["seconds"] + time.perf_counter() - start}
                run.save(optimizer)
                last_save = time.perf_counter()
            t0 = time.perf_counter()
        if profiler:  # an epoch of fewer steps than it profiles
            profiler = profiler.finish()
        seconds = partial["seconds"] + time.perf_counter() - start
        partial["preds"] += torch.cat(preds).tolist() if preds else []
        run.share_unreadable()  # every rank leaves the same files out of the next epoch
        val = evaluate_images(run, run.data.val, validate)
        run.timing("finetune", "eval", time.perf_counter() - t0)
        partial = _merge(run, partial)
        seen = len(partial["labels"])
        if not seen:
            raise WingspanError("No training image could be read.",
                                hint=f"See the files listed in {run.dir / 'train.log'}.")
        state.step, state.partial = 0, {}
        _end_epoch(run, "finetune", epoch, partial["loss_sum"] / max(seen, 1),
                   torch.tensor(partial["labels"]), torch.tensor(partial["preds"]), val,
                   optimizer, seen, time.perf_counter() - start + partial["seconds"],
                   seconds_train=seconds)
        if state.bad_epochs >= config.patience and epoch + 1 < config.epochs_finetune:
            run.log(f"Fine-tuning stopped early: no better val macro-F1 (or val loss at an "
                    f"equal one) in {config.patience} epochs")
            break


def _say_what_finetunes(run: Run, stages: list[str], asked: int, top_lr: float) -> None:
    """Log the stages that fine-tune (`asked`: --unfreeze's count) and their rate. What a
    stage holds differs by family (a ViT's is one block, a ConvNeXt's last only its final
    norm): the share of the backbone's weights says what trains."""
    weights = [(p.numel(), p.requires_grad) for p in run.model.backbone.parameters()]
    share = sum(n for n, trains in weights if trains) / max(1, sum(n for n, _ in weights))
    run.log(f"Fine-tuning {', '.join(stages) if stages else ''}"
            + (f" (of {len(run.model.backbone.stages)}: "
               f"{'under 1%' if share < 0.01 else format(share, '.0%')} of the backbone's "
               f"weights, {_modules(run.model.backbone, stages)}) and " if stages else "")
            + f"the head{'' if stages else ' alone (--unfreeze 0)'}"
            + (f" (all {len(stages)} stages: --unfreeze {asked} asked for more)"
               if asked > len(stages) else "")
            + f"; top learning rate {top_lr:g}, layer decay {run.config.layer_decay}")


def _stop_if_diverged(run: Run, stage: str, epoch: int, step: int) -> None:
    """Stop at the first step that leaves a weight NaN or infinite (a learning rate too
    high, say), keeping the last checkpoint, which was taken before it. The head's weights
    are the same on every rank after a step, so every rank stops at the same one; an fp16
    step whose gradients overflow is skipped by the grad scaler and changes nothing."""
    weight = run.model.head.outputs[run.data.level].weight
    # (a NaN or an infinity makes the sum one too: 0.07 ms where isfinite().all() took 2)
    if bool(weight.detach().sum().isfinite()):
        return
    last = last_checkpoint(run.dir)
    config = run.config  # (the stage's own top rate: stage 2's is --lr x finetune_lr_scale)
    rate = (f"top learning rate {config.lr * config.finetune_lr_scale:g}: --lr {config.lr:g}"
            f" x finetune_lr_scale {config.finetune_lr_scale:g}" if stage == "finetune"
            else f"learning rate {config.lr:g}")
    raise WingspanError(
        f"Training diverged: the weights became NaN or infinite at {stage} epoch {epoch + 1}, "
        f"batch {step + 1} ({rate}). No model was written; "
        + (f"the last checkpoint, from before this, is {last}." if last.is_file()
           else "no checkpoint had been taken yet."),
        hint="Train again with a lower --lr (stage 2 runs at lr x finetune_lr_scale).")


def _modules(backbone, stages: list[str], most: int = 4) -> str:
    """The network's modules the stages train, as timm names them ('blocks.11, norm'): each
    trained parameter's module, to two levels."""
    unreached = backbone.unreached()
    names = dict.fromkeys(".".join(n.split(".")[:-1][:2]) or n for stage in stages
                          for n in backbone.stages[stage] if n not in unreached)
    return some(list(names), most)


def _leave_out_unreadable(run: Run, batches: EpochBatches) -> Weighting:
    """The fine-tuning epoch's order leaves out the images known to be unreadable when it
    began; a resumed epoch the same ones, not those found since (they are left out of the
    next), or its checkpoint's step count would point at other batches. The sampler's
    weights are counted on the images it keeps; returns them with the loss's."""
    state = run.state
    if state.step == 0:
        every_class_readable(run)
        state.epoch_skipped = len(state.skipped)
    known = set(list(state.skipped)[:state.epoch_skipped])  # kept in the order found
    batches.skip = {i for i, path in enumerate(run.data.train.paths) if path in known}
    balance = weighting(run, torch.tensor([path not in known for path in run.data.train.paths]))
    batches.weights = balance.sample
    return balance


def _checkpoint_due(run: Run, last_save: float, step: int) -> bool:
    """Time for a mid-epoch checkpoint? Rank 0's clock decides, asked every few steps only
    in a distributed run (each asking waits for every rank), so that all ranks save
    together."""
    due = time.perf_counter() - last_save > 60 * run.config.checkpoint_minutes
    if run.fabric.world_size == 1:
        return due
    if step % CHECKPOINT_POLL_STEPS:
        return False
    if run.config.strict:  # stop here, before a checkpoint could pass the unreadable image
        run.share_unreadable()
    return run.fabric.broadcast(due)


def _merge(run: Run, partial: dict) -> dict:
    """An epoch's running sums over every rank's slices (each rank gets the total)."""
    parts = gather_objects(run.fabric, [partial])
    merged = {"loss_sum": sum(p[0]["loss_sum"] for p in parts), "labels": [], "preds": [],
              "seconds": partial["seconds"]}
    for p in parts:
        merged["labels"] += p[0]["labels"]
        merged["preds"] += p[0]["preds"]
    return merged


def _add_seconds(run: Run, stage: str, seconds: float) -> None:
    """Set-up time (an export) that belongs to a stage but to none of its epochs."""
    run.state.stage_seconds[stage] = run.state.stage_seconds.get(stage, 0.0) + seconds
    run.timing(stage, "setup", seconds)


def _account(run: Run, stage: str, t0: float, t1: float, t2: float, images: int) -> None:
    """Split a step's time into waiting for data, forward (with the loss), backward (with
    the optimizer step)."""
    now = time.perf_counter()
    run.timing(stage, "data", t1 - t0)
    run.timing(stage, "forward", t2 - t1)
    run.timing(stage, "backward", now - t2)
    run.timing(stage, "images", images)


class _Profiler:
    """`--profile`: a torch.profiler trace of a few fine-tuning steps, for chrome://tracing
    or Perfetto, plus a table of the most expensive operators."""

    STEPS = 4

    def __init__(self, run: Run):
        self.run, self.done = run, 0
        self.profiler = torch.profiler.profile(activities=self.activities(run.device),
                                               record_shapes=True)
        self.profiler.__enter__()

    @staticmethod
    def activities(device: torch.device) -> list:
        """The CPU's, and a GPU's kernels where the step runs there: without them a GPU's
        trace showed the launches alone, not where the time goes."""
        cpu, cuda = torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA
        return [cpu, cuda] if device.type == "cuda" else [cpu]

    def step(self) -> _Profiler | None:
        self.done += 1
        return self if self.done < self.STEPS else self.finish()

    def finish(self) -> None:
        """Write what was profiled: STEPS steps, or all an epoch had (a small data set's
        first epoch may have fewer, and wrote nothing at all)."""
        self.profiler.__exit__(None, None, None)
        if not self.done:
            self.run.log("--profile: the first fine-tuning epoch had no step to profile")
            return None
        out = self.run.dir / "profile"
        out.mkdir(exist_ok=True)
        self.profiler.export_chrome_trace(str(out / "trace.json"))
        (out / "operators.txt").write_text(self.profiler.key_averages().table(
            sort_by="self_device_time_total" if self.run.device.type == "cuda"
            else "self_cpu_time_total", row_limit=30))
        self.run.log(f"Profiled {counted(self.done, 'fine-tuning step')}: {out / 'trace.json'}")
        return None


def _end_epoch(run: Run, stage: str, epoch: int, train_loss: float, labels, preds, val: dict,
               optimizer, images: int, seconds: float,
               seconds_train: float | None = None, checkpoint: bool = True) -> None:
    """Record the epoch, keep the best model, and checkpoint (if `checkpoint`). Rank 0's
    scores decide, on every rank, so that all stop (or not) together."""
    if run.fabric.world_size > 1:
        val = run.fabric.broadcast(val)
    row = {
        "stage": stage, "epoch": epoch + 1, "train_loss": round(train_loss, 5),
        "train_acc": round(float((labels == preds).float().mean()), 5),
        "train_macro_f1": round(macro_f1(labels.numpy(), preds.numpy()), 5),
        "val_loss": round(val["loss"], 5), "val_acc": round(val["acc"], 5),
        "val_macro_f1": round(val["macro_f1"], 5),
        # The top rate (the head's; earlier layers run at a decayed share of it) at the
        # epoch's end, as the scheduler left it.
        "lr": float(f"{max(g['lr'] for g in optimizer.param_groups):.6g}"),
        "images_per_s": round(images / (seconds_train or seconds), 1),
        "seconds": round(seconds, 2),
    }
    improved = run.consider_best(val["macro_f1"], stage, epoch + 1, val["loss"])
    run.state.stage_seconds[stage] = run.state.stage_seconds.get(stage, 0.0) + seconds
    row["elapsed"] = round(sum(run.state.stage_seconds.values()), 2)  # training time so far
    run.add_history(row)
    run.state.epoch = epoch + 1
    if checkpoint:
        run.save(optimizer)
    run.log(f"{stage} {epoch + 1:>3}: loss {row['train_loss']:.4f}  val loss "
            f"{row['val_loss']:.4f}  val acc {row['val_acc']:.3f}  val macro-F1 "
            f"{row['val_macro_f1']:.4f}{'  *' if improved else ''}  ({row['seconds']:.1f}s)")
    if checkpoint:  # (the epoch kept: a SIGTERM lost where it came stops the run here)
        stop_if_signalled()

