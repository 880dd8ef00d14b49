"""Requests that arrive together, answered in one forward pass."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch

from wingspan.config import ServeLimits
from wingspan.inference import Predictor


class Batcher:
    """Collects preprocessed images from concurrent requests into one forward pass."""

    def __init__(self, predictor: Predictor, limits: ServeLimits):
        self.predictor, self.limits = predictor, limits
        self.queue: asyncio.Queue | None = None
        self.loop = None

    async def run(self, image: torch.Tensor
                  ) -> tuple[dict[str, np.ndarray], dict[str, float] | None]:
        """The image's outputs per level, and its unknown scores (None without them)."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # started on the server's loop (a test client may make more)
            self.loop, self.queue = loop, asyncio.Queue()
            loop.create_task(self._serve(self.queue))
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((image, done))
        return await done

    async def _serve(self, queue: asyncio.Queue) -> None:
        while True:
            batch = [await queue.get()]
            deadline = time.perf_counter() + self.limits.batch_wait_ms / 1000
            while len(batch) < self.limits.batch_size:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [item for item in batch if not item[1].done()]  # drop cancelled requests
            if not batch:
                continue
            x = torch.stack([image for image, _ in batch])
            try:
                outputs, scores = await asyncio.to_thread(self.predictor.forward_with_scores, x)
            except Exception as e:  # noqa: BLE001 - every waiting request hears of it
                for _, done in batch:
                    if not done.done():
                        done.set_exception(e)
                continue
            for i, (_, done) in enumerate(batch):
                if not done.done():
                    done.set_result(({lv: o[i].float().numpy() for lv, o in outputs.items()},
                                     {lv: float(v[i]) for lv, v in scores.items()}
                                     if scores else None))
