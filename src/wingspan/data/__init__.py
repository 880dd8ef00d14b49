"""Data: readers to one sample table, inspection, splits, sampling, transforms, demo data."""

from wingspan.data import ethec  # noqa: F401  (registers the ETHEC reader)
from wingspan.data.readers import READERS, detect_format, read_dataset
from wingspan.data.samples import Dataset, Problem

__all__ = ["READERS", "Dataset", "Problem", "detect_format", "read_dataset"]
