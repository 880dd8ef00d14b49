"""The two stages of the recipe, each a plain loop one can read top to bottom.

Stage 1 trains the head on a frozen backbone. The backbone's output for an image then
depends on the image alone, so by default it runs once per view (a clean view plus K
augmented ones) and the head trains on those cached features for as many epochs as it
needs. Stage 2 unfreezes the last stages and trains end to end.
"""

from __future__ import annotations

import time

import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import f1_score
from torch import nn

from wingspan.progress import Bar, track
from wingspan.train.context import Run
from wingspan.train.data import VIEW_CHOICE, EpochSampler, LabelledImages, item_seed, make_loader
from wingspan.train.schedule import finetune_groups, make_scheduler
from wingspan.train.step import finetune_forward


def macro_f1(labels, preds) -> float:
    return float(f1_score(labels, preds, average="macro", zero_division=0))


class Criterion:
    """Cross-entropy per trained level (class-weighted, label-smoothed), summed with the
    level weights. Labels are (N, levels), one column per level."""

    def __init__(self, run: Run):
        self.levels = run.data.levels
        self.weights = run.data.level_weights
        self.losses = {lv: nn.CrossEntropyLoss(weight=run.data.class_weights[lv],
                                               label_smoothing=run.config.label_smoothing)
                       for lv in self.levels}

    def __call__(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        total = sum(self.weights[lv] * self.losses[lv](outputs[lv].float(), labels[:, i])
                    for i, lv in enumerate(self.levels))
        return total / sum(self.weights.values())


def loss_fn(run: Run) -> Criterion:
    return Criterion(run)


def _logits(run: Run, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The finest level's logits: what the model predicts and is selected on."""
    return outputs[run.data.level].float()


# --- evaluation -------------------------------------------------------------------------

@torch.inference_mode()
def evaluate_features(run: Run, features: torch.Tensor, labels: torch.Tensor) -> dict:
    run.model.head.eval()
    outputs = [run.model.head(features[i:i + 1024]) for i in range(0, len(features), 1024)]
    return _scores(run, _concat(outputs), labels)


@torch.inference_mode()
def evaluate_images(run: Run, images: LabelledImages) -> dict:
    run.model.eval()
    forward = run.policy.runner(run.model, run.image_size, run.model.levels)
    loader = make_loader(images, EpochSampler(len(images), 0, 0, shuffle=False),
                         run.config.batch_size, run.workers)
    outputs, labels = [], []
    for x, y, _ in loader:
        outputs.append(forward(x))
        labels.append(y)
    return _scores(run, _concat(outputs), torch.cat(labels))


def _concat(outputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {lv: torch.cat([o[lv] for o in outputs]) for lv in outputs[0]}


def _scores(run: Run, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict:
    preds, truth = _logits(run, outputs).argmax(1), labels[:, -1]
    return {"loss": float(loss_fn(run)(outputs, labels)),
            "acc": float((preds == truth).float().mean()),
            "macro_f1": macro_f1(truth.numpy(), preds.numpy())}


# --- stage 1: the head on a frozen backbone ----------------------------------------------

@torch.inference_mode()
def extract_features(run: Run, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of every training image (clean view + `views` augmented ones) and
    of every validation image; kept in the run so a resumed run does not redo them."""
    path = run.dir / "cache" / "features.safetensors"
    n, m = len(run.data.train), len(run.data.val)
    if path.is_file():
        saved = load_file(path)
        if saved["train"].shape[:2] == (n, views + 1) and len(saved["val"]) == m:
            return saved["train"], saved["val"]
    start = time.perf_counter()  # the export (if any) counts as part of the cache pass
    run.model.eval()
    features = run.policy.runner(run.model.feature_extractor(), run.image_size)
    width = run.model.backbone.num_features
    train, val = torch.empty(n, views + 1, width), torch.empty(m, width)
    # (images, view, destination): view 0 is the clean view, 1..K augmented ones.
    jobs = [(run.data.train_clean, 0, train[:, 0])]
    jobs += [(run.data.train, v, train[:, v]) for v in range(1, views + 1)]
    jobs += [(run.data.val, 0, val)]
    with Bar(n * (views + 1) + m, "Caching backbone features", not run.quiet) as bar:
        for images, view, out in jobs:
            requests = [(i, 0, view) for i in range(len(images))]
            for x, _, idx in make_loader(images, requests, run.config.batch_size, run.workers):
                out[idx] = features(x)
                bar.advance(len(idx))
    seconds = time.perf_counter() - start
    run.state.stage_seconds["head"] = run.state.stage_seconds.get("head", 0.0) + seconds
    run.timing("head", "feature_cache", seconds)
    run.log(f"Cached features of {n} training images x {views + 1} views and {m} validation "
            f"images in {seconds:.1f}s ({(n * (views + 1) + m) / seconds:.1f} images/s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"train": train.contiguous(), "val": val.contiguous()}, path)
    return train, val


def train_head(run: Run) -> None:
    """Stage 1. The backbone is frozen; only the head's parameters get an optimizer."""
    config, state = run.config, run.state
    run.model.backbone.freeze()
    head = run.model.head
    labels = run.data.train.labels
    n = len(labels)
    steps_per_epoch = -(-n // config.batch_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, steps_per_epoch * config.epochs_head, 0.0)
    run.restore_optimizer(optimizer, scheduler)
    cached = config.feature_cache
    if cached:
        train_feats, val_feats = extract_features(run, config.feature_views)
    else:  # the backbone's weights stay frozen, so one runner serves the whole stage
        start = time.perf_counter()
        frozen = run.policy.runner(run.model.feature_extractor(), run.image_size)
        _add_seconds(run, "head", time.perf_counter() - start)
    criterion = loss_fn(run)
    for epoch in range(state.epoch, config.epochs_head):
        start = time.perf_counter()
        order = EpochSampler(n, config.seed, epoch, weights=run.data.sample_weights).order()
        g = torch.Generator().manual_seed(item_seed(config.seed, epoch, VIEW_CHOICE))
        views = torch.randint(0, config.feature_views + 1, (n,), generator=g)
        head.train()
        loss_sum, preds = 0.0, torch.empty(n, dtype=torch.long)
        seen = []
        for b in range(0, n, config.batch_size):
            t0 = time.perf_counter()
            idx = torch.tensor(order[b:b + config.batch_size])
            if cached:
                feats = train_feats[idx, views[idx]]
            else:
                feats = _frozen_features(run, frozen, idx, views[idx], epoch)
            t1 = time.perf_counter()
            outputs = head(feats)
            logits = _logits(run, outputs)
            loss = criterion(outputs, labels[idx])
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            seen.append(idx)
            preds[idx] = logits.argmax(1).detach()
            _account(run, "head", t0, t1, t2, len(idx))
        seen_idx = torch.cat(seen)
        t0 = time.perf_counter()
        val = (evaluate_features(run, val_feats, run.data.val.labels) if cached
               else evaluate_images(run, run.data.val))
        run.timing("head", "eval", time.perf_counter() - t0)
        _end_epoch(run, "head", epoch, loss_sum / len(seen_idx), labels[seen_idx, -1],
                   preds[seen_idx], val, optimizer, len(seen_idx), time.perf_counter() - start)
        if state.bad_epochs >= config.patience and epoch + 1 < config.epochs_head:
            run.log(f"Head stage stopped early: no better val macro-F1 in {config.patience} "
                    "epochs")
            break


@torch.inference_mode()
def _frozen_features(run: Run, frozen, idx: torch.Tensor, views: torch.Tensor, epoch: int):
    """Without the cache: run the frozen backbone on this batch (clean or augmented)."""
    items = [run.data.train_clean[(int(i), 0, 0)] if v == 0 else run.data.train[(int(i), epoch, 1)]
             for i, v in zip(idx, views, strict=True)]
    return frozen(torch.stack([item[0] for item in items]))


# --- stage 2: fine-tune the last stages --------------------------------------------------

def finetune(run: Run) -> None:
    config, state = run.config, run.state
    n_stages = run.model.spec.unfreeze if config.unfreeze is None else config.unfreeze
    stages = run.model.backbone.unfreeze_last(n_stages)
    top_lr = config.lr * config.finetune_lr_scale
    optimizer = torch.optim.AdamW(
        finetune_groups(run.model, stages, top_lr, config.layer_decay, config.weight_decay))
    n = len(run.data.train)
    steps_per_epoch = -(-n // config.batch_size)
    scheduler = make_scheduler(optimizer, steps_per_epoch * config.epochs_finetune,
                               config.warmup_fraction)
    run.restore_optimizer(optimizer, scheduler)
    if state.epoch == 0 and state.step == 0:
        run.log(f"Fine-tuning {', '.join(stages)} and the head; top learning rate {top_lr:g}, "
                f"layer decay {config.layer_decay}")
    criterion = loss_fn(run)
    start = time.perf_counter()
    forward = finetune_forward(run.model, run.policy, run.image_size)
    _add_seconds(run, "finetune", time.perf_counter() - start)
    for epoch in range(state.epoch, config.epochs_finetune):
        partial = state.partial or {"loss_sum": 0.0, "labels": [], "preds": [], "seconds": 0.0}
        start, last_save = time.perf_counter(), time.perf_counter()
        sampler = EpochSampler(n, config.seed, epoch, view=1, weights=run.data.sample_weights,
                               start=state.step * config.batch_size)
        loader = make_loader(run.data.train, sampler, config.batch_size, run.workers)
        run.model.train()
        bar = track(loader, f"Fine-tune epoch {epoch + 1}/{config.epochs_finetune}",
                    total=len(loader), enabled=not run.quiet)
        profiler = _Profiler(run) if config.profile and epoch == 0 else None
        t0 = time.perf_counter()
        for x, y, _ in bar:
            t1 = time.perf_counter()
            outputs = forward(x)
            logits = _logits(run, outputs)
            loss = criterion(outputs, y)
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            state.step += 1
            _account(run, "finetune", t0, t1, t2, len(y))
            if profiler:
                profiler = profiler.step()
            partial["loss_sum"] += loss.item() * len(y)
            partial["labels"] += y[:, -1].tolist()
            partial["preds"] += logits.argmax(1).tolist()
            if time.perf_counter() - last_save > 60 * config.checkpoint_minutes:
                state.partial = {**partial, "seconds": partial["seconds"] + time.perf_counter()
                                 - start}
                run.save(optimizer, scheduler)
                last_save = time.perf_counter()
            t0 = time.perf_counter()
        seconds = partial["seconds"] + time.perf_counter() - start
        val = evaluate_images(run, run.data.val)
        run.timing("finetune", "eval", time.perf_counter() - t0)
        seen = len(partial["labels"])
        state.step, state.partial = 0, {}
        _end_epoch(run, "finetune", epoch, partial["loss_sum"] / max(seen, 1),
                   torch.tensor(partial["labels"]), torch.tensor(partial["preds"]), val,
                   optimizer, seen, time.perf_counter() - start + partial["seconds"],
                   scheduler, seconds_train=seconds)
        if state.bad_epochs >= config.patience and epoch + 1 < config.epochs_finetune:
            run.log(f"Fine-tuning stopped early: no better val macro-F1 in {config.patience} "
                    "epochs")
            break


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
        self.profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        self.profiler.__enter__()

    def step(self) -> _Profiler | None:
        self.done += 1
        if self.done < self.STEPS:
            return self
        self.profiler.__exit__(None, None, None)
        out = self.run.dir / "profile"
        out.mkdir(exist_ok=True)
        self.profiler.export_chrome_trace(str(out / "trace.json"))
        (out / "operators.txt").write_text(self.profiler.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=30))
        self.run.log(f"Profiled {self.STEPS} fine-tuning steps: {out / 'trace.json'}")
        return None


def _end_epoch(run: Run, stage: str, epoch: int, train_loss: float, labels, preds, val: dict,
               optimizer, images: int, seconds: float, scheduler=None,
               seconds_train: float | None = None) -> None:
    """Record the epoch, keep the best model, and checkpoint."""
    row = {
        "stage": stage, "epoch": epoch + 1, "train_loss": round(train_loss, 5),
        "train_acc": round(float((labels == preds).float().mean()), 5),
        "train_macro_f1": round(macro_f1(labels.numpy(), preds.numpy()), 5),
        "val_loss": round(val["loss"], 5), "val_acc": round(val["acc"], 5),
        "val_macro_f1": round(val["macro_f1"], 5),
        "lr": float(f"{optimizer.param_groups[0]['lr']:.6g}"),
        "images_per_s": round(images / (seconds_train or seconds), 1),
        "seconds": round(seconds, 2),
    }
    improved = run.consider_best(val["macro_f1"], stage, epoch + 1)
    run.state.stage_seconds[stage] = run.state.stage_seconds.get(stage, 0.0) + seconds
    row["elapsed"] = round(sum(run.state.stage_seconds.values()), 2)  # training time so far
    run.add_history(row)
    run.state.epoch = epoch + 1
    run.save(optimizer, scheduler)
    run.log(f"{stage} {epoch + 1:>3}: loss {row['train_loss']:.4f}  val loss "
            f"{row['val_loss']:.4f}  val acc {row['val_acc']:.3f}  val macro-F1 "
            f"{row['val_macro_f1']:.4f}{'  *' if improved else ''}  ({row['seconds']:.1f}s)")

