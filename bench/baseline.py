"""The plain recipe, as tutorials write it: the reference wingspan is measured against.

fp32, eager, NCHW; every image decoded and augmented again in every epoch; the frozen
backbone run on every batch of stage 1; then the last stages fine-tuned. Adam,
class-weighted cross-entropy, 5 + 5 epochs, batch 32. The same backbone, pretrained
weights, preprocessing and splits as wingspan's run, so only the method differs.
"""

from __future__ import annotations

import time

import torch
from PIL import Image
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from wingspan.data.sampling import class_weights
from wingspan.models import create_classifier


class Files(Dataset):
    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = Image.open(self.paths[i]).convert("RGB")
        return self.transform(image), self.labels[i]


def plain_recipe(train, val, classes, backbone, weights="auto", epochs=(5, 5),
                 batch_size=32, lr=(1e-3, 1e-4), unfreeze=None, image_size=None, workers=1,
                 seed=0, log=print) -> list[dict]:
    """`train`/`val`: (paths, labels) with labels as class indices. Returns one row per
    epoch: stage, epoch, val macro-F1, seconds (train + val) and elapsed wall time."""
    torch.manual_seed(seed)
    model, _ = create_classifier(backbone, {"y": len(classes)}, weights)
    pre = model.preprocessing
    size = image_size or pre.input_size
    norm = T.Normalize(pre.mean, pre.std)
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                          norm])
    eval_tf = T.Compose([T.Resize(round(size / pre.crop_pct)), T.CenterCrop(size), T.ToTensor(),
                         norm])
    train_loader = DataLoader(Files(*train, train_tf), batch_size, shuffle=True,
                              num_workers=workers)
    val_loader = DataLoader(Files(*val, eval_tf), batch_size, num_workers=workers)
    names = [classes[i] for i in train[1]]
    weight = torch.tensor([class_weights(names)[c] for c in classes], dtype=torch.float)
    criterion = nn.CrossEntropyLoss(weight=weight)

    rows, start = [], time.perf_counter()
    for stage, n_epochs, rate in (("head", epochs[0], lr[0]), ("finetune", epochs[1], lr[1])):
        if stage == "head":
            model.backbone.freeze()
        else:
            model.backbone.unfreeze_last(model.spec.unfreeze if unfreeze is None else unfreeze)
            model.backbone.train_bn = True  # as tutorials do: BatchNorm back in train mode
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=rate)
        for epoch in range(n_epochs):
            t0 = time.perf_counter()
            model.train()
            for x, y in train_loader:
                loss = criterion(model(x)["y"], y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            train_seconds = time.perf_counter() - t0
            model.eval()
            preds, truth = [], []
            with torch.no_grad():
                for x, y in val_loader:
                    preds.append(model(x)["y"].argmax(1))
                    truth.append(y)
            f1 = f1_score(torch.cat(truth), torch.cat(preds), average="macro")
            rows.append({"stage": stage, "epoch": epoch + 1, "val_macro_f1": round(float(f1), 5),
                         "train_images_per_s": round(len(train[0]) / train_seconds, 1),
                         "seconds": round(time.perf_counter() - t0, 1),
                         "elapsed": round(time.perf_counter() - start, 1)})
            log(f"baseline {stage} {epoch + 1}: val macro-F1 {f1:.4f} "
                f"({rows[-1]['seconds']}s, elapsed {rows[-1]['elapsed']}s)")
    return rows


def time_to_reach(rows: list[dict], target: float) -> float | None:
    """Elapsed seconds at the first epoch whose val macro-F1 reaches `target`."""
    for r in rows:
        if r["val_macro_f1"] >= target - 1e-9:
            return r["elapsed"]
    return None


def stage_end(rows: list[dict], stage: str) -> dict | None:
    picked = [r for r in rows if r["stage"] == stage]
    return picked[-1] if picked else None


def best(rows: list[dict]) -> float:
    return max(r["val_macro_f1"] for r in rows) if rows else float("nan")

