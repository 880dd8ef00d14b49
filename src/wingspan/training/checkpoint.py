"""Checkpoints a killed run resumes from: written atomically, loaded as tensors only."""

from __future__ import annotations

from pathlib import Path

import torch

from wingspan.errors import WingspanError, first_line
from wingspan.files import atomic_path


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save through a temporary file: a kill never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict:
    """Only tensors and plain containers are accepted (`weights_only=True`)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WingspanError(f"No checkpoint at {path}.") from e
    except Exception as e:
        raise WingspanError(f"The checkpoint {path} cannot be read: {first_line(e)}",
                            hint="It may be damaged; the previous run cannot resume from it.") \
            from e
