"""Batches for training: labelled images through the decode cache and a transform.

Augmentation randomness is seeded per (seed, epoch, image, view), not drawn from a
worker's stream, so a run gives the same batches whatever the number of workers and
whether or not it was interrupted and resumed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors

from wingspan.train.decode_cache import DecodeCache

# An item request: (sample index, epoch, view); the seed mixes all three.
Request = tuple[int, int, int]


# Stand-ins for an image index when seeding per-epoch draws rather than one image.
ORDER, VIEW_CHOICE = 2**32 - 1, 2**32 - 2


def item_seed(seed: int, epoch: int, index: int, view: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, view]).generate_state(1)[0])


class LabelledImages(Dataset):
    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform: Callable,
                 cache: DecodeCache, seed: int):
        self.paths, self.labels = list(paths), torch.as_tensor(labels, dtype=torch.long)
        self.transform, self.cache, self.seed = transform, cache, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, request: Request) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, epoch, view = request
        image = tv_tensors.Image(torch.from_numpy(self.cache.load(self.paths[index]))
                                 .permute(2, 0, 1))
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
            torch.manual_seed(item_seed(self.seed, epoch, index, view))
            return self.transform(image), self.labels[index], index


class EpochSampler(Sampler[Request]):
    """One epoch's order: a seeded permutation (or weighted draw), skipping `start` items
    already done when a run resumes mid-epoch."""

    def __init__(self, n: int, seed: int, epoch: int, view: int = 0,
                 weights: torch.Tensor | None = None, start: int = 0,
                 shuffle: bool = True):
        self.n, self.seed, self.epoch, self.view = n, seed, epoch, view
        self.weights, self.start, self.shuffle = weights, start, shuffle

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, ORDER))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True,
                                     generator=g).tolist()
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[Request]:
        for index in self.order()[self.start:]:
            yield index, self.epoch, self.view

    def __len__(self) -> int:
        return self.n - self.start


def default_workers() -> int:
    # Leave a core for the model; on 2 cores one worker keeps decoding off the main thread.
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def make_loader(dataset: LabelledImages, sampler: EpochSampler, batch_size: int,
                workers: int) -> DataLoader:
    # Its own generator: a loader must not draw from the global random stream, or dropout
    # masks would depend on how many loaders ran before (and a resumed run would differ).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=False,
                      generator=torch.Generator().manual_seed(0))
