"""Every default in one place, as typed and validated dataclasses.

The CLI reads its defaults from here, so a default changes in exactly one line.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import reprlib
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

from wingspan.errors import CODE_PAGES, WingspanError

# The augmentation policies (wingspan.data.transforms registers one for each name) and how
# many species the demo can draw (wingspan.data.demo): here, so that the config depends on
# nothing above it.
AUGMENT_POLICIES = ("light", "standard", "strong", "field")
DEMO_SPECIES = 8
# `--backbone auto`: the classic choice when its weights resolve, else the best of those
# that install offline (pip packages), best first.
DEFAULT_BACKBONE = "resnet50"
OFFLINE_BACKBONES = ("efficientnet_lite2", "efficientnet_lite0")
# `data audit --backbone auto`: both offline backbones' features side by side (installed
# with wingspan, so the same on every machine). Together their head found more deliberate
# label flips than either alone, at every share flipped (README); the first one's features
# find the near-duplicates, whose similarity was measured on it.
AUDIT_BACKBONES = OFFLINE_BACKBONES
# Out-of-distribution scores a bundle carries (wingspan.models.unknown); the default is
# TrainConfig.unknown_score.
UNKNOWN_SCORES = ("msp", "energy", "mahalanobis", "knn", "msp+knn")
# The pixel budget of one image (about 50 MP; a decoded pixel takes 3-4 bytes, several
# times over while converting). $WINGSPAN_MAX_PIXELS (or --max-pixels) changes it.
MAX_PIXELS, MAX_PIXELS_ENV = 50_000_000, "WINGSPAN_MAX_PIXELS"
MAX_FEATURE_VIEWS = 64  # augmented views cached per training image for the head stage
# Image files smaller than this are decoded afresh each epoch rather than kept decoded in
# the cache: on a 2-core Xeon a 448-px JPEG (66 KB, ETHEC's) decodes and resizes in 2.9 ms,
# an 800 x 600 one (159 KB) in 3.1 ms, against 0.05 ms to load its entry, which takes
# 190-330 KB of disk (10-13 GiB per image size for ETHEC's 48k); a 1600 x 1200 JPEG
# (634 KB) takes 7 ms and a 12 MP photo 33 ms: those are kept. So is a small file of many
# pixels (a 12 MP PNG of one colour is 41 KB, and took 478 ms a load), by its header
# (0.02 ms to read).
DECODE_CACHE_MIN_BYTES, DECODE_CACHE_MIN_PIXELS = 256 * 1024, 2_000_000
MAX_PROCESSES = 1024  # --devices per machine and --nodes: more is a slip (and overflowed)
# How long the other ranks wait for rank 0 to end a run alone (the lossy check, the final
# passes over up to 5,000 train images and all of val, the bundle), which at ETHEC's size
# on a CPU can pass torch's 30 minutes (parallel.long_wait).
RANK_WAIT_HOURS = 6
BATCH_SIZE = 32  # images per batch: training's, and predict's, evaluate's and calibrate's
MAX_BATCH = 2**16  # images per predict or evaluate batch: more is a slip (and overflowed)
# The engines' names, checked with the other settings (a typo was said only once the data
# was read and torch imported: 9 s on iNat); models/engine.py and parallel.py take them.
PRECISION_NAMES = ("fp32", "bf16", "fp16")
RUNTIMES = ("torch", "onnx")
STRATEGIES = ("auto", "ddp")
# .jfif and .jpe: JPEGs as Windows browsers save them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp")
SPLITS = ("train", "val", "test")
# Where `wingspan train` writes its runs (--runs-dir) and `wingspan runs` lists them.
RUNS_DIR = "runs"
TOP_K = 3  # classes a prediction lists (a server's answer: ServeLimits.top_k)
# Cards on `predict --output X.html`, the least sure first (~6 KB of thumbnail each): a
# page of 40,000 would not open; the CSV or JSON keeps every image.
PREDICT_PAGE_IMAGES = 1000
# A predict that answers more than this share unknown says what may be done (`adapt`).
UNKNOWN_SHARE_SAID = 0.25
# The images predict's terminal table shows (all: --output): a taxonomy's branch takes 7-9
# lines an image at 80 columns (466 lines for 50 images of a 4-level model), one level's
# answer one or two
PREDICT_ROWS, PREDICT_ROWS_TAXONOMY = 50, 15
# Where `wingspan serve` listens unless told (this machine only)
SERVE_HOST, SERVE_PORT = "127.0.0.1", 8000
# `wingspan data preview`'s grid: classes shown (one image each), augmented views of each
PREVIEW_ROWS, PREVIEW_VIEWS = 6, 5


def _optimizer_runs(name: str) -> bool:
    """Whether timm makes the optimizer `name` here: built once on a parameter, so that one
    whose package is missing (apex, bitsandbytes) is refused before the data is read, not
    after the feature cache (a traceback)."""
    import torch
    from timm.optim import create_optimizer_v2, list_optimizers

    if name not in list_optimizers() or name.startswith(("fused", "bnb")) or \
            name == "adahessian":
        return False
    try:
        create_optimizer_v2(torch.nn.Linear(1, 1), name, lr=1e-3)
    except Exception:  # noqa: BLE001 - whatever stops it is a refusal, said as one
        return False
    return True


class SettingError(WingspanError):
    """Settings that a config refuses, each named at the start of its problem, so that the
    CLI can name the option the user typed in its place (`worded`)."""

    def __init__(self, problems: list[tuple[str, str]], intro: str = "", form: str = "'{}'",
                 hint: str | None = None):
        self.problems, self.intro, self.form = problems, intro, form
        super().__init__(self.worded({}), hint)

    def worded(self, options: dict[str, str], named: dict[str, str] | None = None) -> str:
        """The message, each setting named by its entry in `options` (val_fraction:
        --val-fraction) where it has one, else as a setting; a sum of settings
        ('val_fraction + test_fraction'), part by part. Another setting a problem names
        (`another`) is named by its option where the command has one (`named`), typed or
        not: "--level-weights must be given with --levels", not "with 'levels'"."""

        def name(setting: str) -> str:
            if not any(part in options for part in re.findall(r"\w+", setting)):
                return self.form.format(setting)
            return re.sub(r"\w+", lambda m: options.get(m[0], m[0]), setting)

        every = {**(named or {}), **options}

        def mentioned(text: str) -> str:  # another setting a problem names (`another`)
            return re.sub("\0(\\w+)\0", lambda m: every.get(m[1]) or f"'{m[1]}'", text)

        return self.intro + " | ".join(name(setting) + mentioned(text)
                                       for setting, text in self.problems)

    def __reduce__(self):  # pickled by worker processes: not as (message,); the state keeps
        # what was set after construction (every_rank)
        return type(self), (self.problems, self.intro, self.form, self.hint), self.__dict__


# Settings other trainers (timm's train.py) name in words no spelling distance finds.
_OTHER_NAMES = {"model": "backbone", "arch": "backbone", "pretrained": "weights",
                "amp": "precision"}


def closest_settings(name: object, fields: list[str], n: int = 1) -> list[str]:
    """The settings an unknown one most likely means: the nearest spellings (epoch_head:
    epochs_head), else the one its initials abbreviate or that abbreviates it, as other
    tools name them (learning_rate: lr, bs: batch_size), else those it is a word of."""
    name = str(name).lower().replace("-", "_")
    if _OTHER_NAMES.get(name) in fields:
        return [_OTHER_NAMES[name]]
    close = difflib.get_close_matches(name, fields, n=n)
    if close or len(name) < 2:
        return close

    def initials(words: str) -> str:
        return "".join(w[:1] for w in words.split("_") if w)

    abbreviated = [f for f in fields if f == initials(name) or initials(f) == name]
    # Else the settings it is a word of (map: class_map).
    return (abbreviated or [f for f in fields if name in f.split("_")])[:n]


def check_names(given, valid: list[str], unknown: str = "Unknown setting '{}'.",
                listed: str = "Valid") -> None:
    """The first of the `given` keywords not in `valid` as a WingspanError (`unknown`,
    formatted with it) naming the closest valid ones, then every one."""
    for key in given:
        if key not in valid:
            close = closest_settings(key, valid, n=3)
            raise WingspanError(
                unknown.format(key),
                hint=(f"Did you mean {' or '.join(repr(c) for c in close)}? " if close else "")
                + f"{listed}: {', '.join(valid)}.")


def usable_cores() -> int:
    """The CPU cores this process may use: a container's cpuset, SLURM or `taskset` may
    allow fewer than the machine has, and a thread or worker per core of the machine then
    crowds them; so may a CPU quota (Docker's cpus option, a Kubernetes limit), which
    allows that many cores' time, rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    quota = cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


# Where a container sees its own CPU quota: cgroup v2's "QUOTA PERIOD" (or "max PERIOD"),
# else cgroup v1's two files (a quota of -1: none).
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_QUOTA = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


CGROUP_SELF = "/proc/self/cgroup"  # this process's cgroups, below those roots


def cpu_quota() -> float | None:
    """The cores' worth of CPU time a cgroup quota allows this process, or None: the
    smallest from its own cgroup up to the root (a parent's holds too). A container sees
    its own at the root; a quota set by systemd (CPUQuota=) or a batch system on a cgroup
    below it was missed, and its threads then waited on it as if on other work."""
    v2, v1 = Path(CGROUP_CPU_MAX).parent, Path(CGROUP_V1_QUOTA[0]).parent
    folders = [(v2, "v2"), (v1, "v1")]
    try:  # lines "0::/a/b" (v2), "4:cpu,cpuacct:/a/b" (v1)
        for line in Path(CGROUP_SELF).read_text().splitlines():
            number, controllers, path = line.split(":", 2)
            base, kind = ((v2, "v2") if number == "0" else (v1, "v1")
                          if "cpu" in controllers.split(",") else (None, ""))
            if base is not None:
                parts = Path(path.lstrip("/")).parts
                folders += [(base.joinpath(*parts[:i]), kind) for i in range(1, len(parts) + 1)]
    except (OSError, ValueError):
        pass
    quotas = [q for folder, kind in folders if (q := _quota_in(folder, kind)) is not None]
    return min(quotas) if quotas else None


def _quota_in(folder: Path, kind: str) -> float | None:
    """A cgroup folder's quota, in cores: v2's "QUOTA PERIOD" (or "max PERIOD"), v1's two
    files (a quota of -1: none)."""
    try:
        if kind == "v2":
            quota, period = (folder / Path(CGROUP_CPU_MAX).name).read_text().split()[:2]
            return int(quota) / int(period) if quota != "max" else None
        quota, period = (int((folder / Path(f).name).read_text()) for f in CGROUP_V1_QUOTA)
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def settings(cls=None, **options):
    """@dataclass, whose constructor names an unknown keyword as a WingspanError with the
    closest valid ones (TrainConfig(epoch_head=1): epochs_head), not a bare TypeError."""
    def wrap(cls):
        cls = dataclass(cls, **options)
        init = cls.__init__

        @functools.wraps(init)
        def checked_init(self, *args, **kwargs):
            check_names(kwargs, list(cls.__dataclass_fields__))
            init(self, *args, **kwargs)

        cls.__init__ = checked_init
        return cls

    return wrap if cls is None else wrap(cls)


def _strict_loader():
    """YAML's safe loader, refusing a key given twice (PyYAML keeps the last in silence: a
    copied line edited in one place and not the other)."""
    import yaml

    class Strict(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            if twice := sorted({str(k) for k in keys if keys.count(k) > 1}):
                raise yaml.constructor.ConstructorError(
                    None, None, f"{', '.join(twice)} given twice", node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return Strict


def _shown(value) -> str:
    """A value as a refusal quotes it: its repr, cut short where long or deep (a YAML
    alias bomb of 1 KB, a billion items, hung `train --config` building its message)."""
    said = reprlib.Repr()
    said.maxlevel, said.maxlist, said.maxdict, said.maxstring, said.maxother = 3, 8, 8, 200, 200
    if isinstance(value, list | tuple) and value and all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in value[:9]):
        # a list of names or numbers as its option takes it (--levels family,genus), not
        # Python's ['family', 'genus'] ([1.0, 2.0] for --level-weights 1,2)
        text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value[:8])
        return text[:200] + (",..." if len(value) > 8 or len(text) > 200 else "")
    return said.repr(value)


def another(setting: str) -> str:
    """Another setting named in a problem's words, which SettingError.worded names as the
    user gave it (--max-per-class): marked by NULs, which no value's repr holds (a value
    "{max_per_class}" is the user's own text)."""
    return f"\0{setting}\0"


def _check_engines(config) -> None:
    """`precision` and `runtime`: auto or one the engines know ($WINGSPAN_PRECISION and
    $WINGSPAN_RUNTIME are read, and checked, where auto is resolved)."""
    _check(config.precision in ("auto", *PRECISION_NAMES), "precision",
           f"one of {', '.join(('auto', *PRECISION_NAMES))}", config.precision)
    _check(config.runtime in ("auto", *RUNTIMES), "runtime",
           f"one of {', '.join(('auto', *RUNTIMES))}", config.runtime)


def _check_device(config) -> None:
    """The device's spelling, before torch is imported (seconds, before 'gpu' was refused);
    whether that GPU is there is asked of torch where the device is opened."""
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", config.device) is not None, "device",
           "auto, cpu, cuda or cuda:N (the Nth GPU)", config.device)


def _check(ok: bool, name: str, expected: str, got: object) -> None:
    if not ok:
        raise SettingError([(name, f" must be {expected}. Got {_shown(got)} instead.")],
                           form="The '{}' setting")


@cache
def _adapters(cls: type) -> dict:
    """pydantic's validator for each field's declared type (finite numbers only)."""
    from pydantic import ConfigDict, TypeAdapter

    strict_numbers = ConfigDict(allow_inf_nan=False)
    return {name: TypeAdapter(kind, config=strict_numbers)
            for name, kind in get_type_hints(cls).items() if name in cls.__dataclass_fields__}


def comma_list(text: str) -> list[str]:
    """"family, genus" as the command takes a list: ["family", "genus"]."""
    return [part.strip() for part in text.split(",") if part.strip()]


@cache
def _yes_no_fields(cls: type) -> frozenset[str]:
    """The fields that take true or false (pydantic would read `epochs_head: true` as 1)."""
    return frozenset(name for name, kind in get_type_hints(cls).items()
                     if kind is bool or bool in get_args(kind))


@cache
def _list_fields(cls: type) -> frozenset[str]:
    """The fields that hold a list (levels, holdout_classes...), optional or not."""
    def is_list(kind) -> bool:
        return get_origin(kind) is list or any(is_list(k) for k in get_args(kind))

    return frozenset(name for name, kind in get_type_hints(cls).items()
                     if name in cls.__dataclass_fields__ and is_list(kind))


# Settings counted in bytes or pixels, which may pass 2**31 (a 4 GB upload limit)
BYTE_SIZED = frozenset({"max_bytes", "decode_pixels"})


def _check_types(config: object) -> None:
    """Every field against its declared type, before any range check: 'two' for an int,
    1.5 epochs, inf or NaN, a number for a name. Values of the right kind in another form
    ('3' for 3; for a list, "family,genus" as the command takes it) are converted. Raises
    a SettingError naming each wrong setting."""
    from pydantic import ValidationError

    problems = []
    for name, adapter in _adapters(type(config)).items():
        value = getattr(config, name)
        if isinstance(value, os.PathLike):  # a Path for a file or folder setting
            value = os.fspath(value)
        if isinstance(value, str) and name in _list_fields(type(config)):
            value = comma_list(value)
        if isinstance(value, bool) and name not in _yes_no_fields(type(config)):
            problems.append((name, f" = {_shown(value)}: true or false, where a number or a name "
                                   "goes"))
            continue
        try:
            setattr(config, name, adapter.validate_python(value))
        except ValidationError as e:
            why = "; ".join(err["msg"] for err in e.errors())
            problems.append((name, f" = {_shown(value)}: {why}"))
        else:  # (99999999999999999999 overflowed torch, islice or a C int: a traceback)
            value = getattr(config, name)
            most = 2**53 if name in BYTE_SIZED else 2**31 - 1
            if name != "seed" and type(value) is int and abs(value) > most:  # (seed: below)
                problems.append((name, f" = {_shown(value)}: too large to mean anything here "
                                       f"(at most {most:,})"))
    seed = getattr(config, "seed", 0)
    if not problems and not 0 <= seed < 2**32:  # numpy's random generators take no other
        problems.append(("seed", f" = {seed!r}: must be between 0 and 2**32 - 1"))
    if problems:
        raise SettingError(problems, intro="Invalid settings: ",
                           hint="Fix these where they were given: the config file, the "
                                "command line, or the keywords in Python.")


@settings
class ReadConfig:
    """How a dataset is read."""

    format: str | None = None  # folder | split-folders | csv | ethec; None = detect
    group_regex: str | None = None  # regex on the file name; its first group is the group key
    strict: bool = False  # unreadable or missing files are an error instead of skipped + listed
    check_files: bool = True  # False reads labels only (e.g. ETHEC split files without images)

    def __post_init__(self) -> None:
        _check_types(self)


@settings
class InspectConfig:
    """What `data inspect` flags."""

    tiny_px: int = 64  # images whose shorter side is below this are "tiny"
    workers: int = field(default_factory=lambda: min(8, usable_cores()))  # decoding threads
    many_classes: int = 40  # above this many classes the balance plot becomes a sorted log plot

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.tiny_px >= 1, "tiny_px", "a positive number of pixels", self.tiny_px)
        _check(self.workers >= 1, "workers", "at least 1", self.workers)


@settings
class ServeLimits:
    """What `wingspan serve` takes on, and how it batches."""

    max_bytes: int = 20 * 2**20  # per uploaded file; larger gets 413
    max_in_flight: int = 64  # requests being served at once; more get 429
    max_files: int = 32  # images in one request; more get 413 (each is read whole)
    timeout_s: float = 30.0  # per request; slower gets 504
    # An upload that sends nothing for this long, or (after this long) comes slower than
    # min_upload_rate bytes a second on average, gets 408: a stalled client held its place
    # in flight for good. (A full 20 MB file at that rate takes 17 min.)
    upload_idle_s: float = 30.0
    min_upload_rate: float = 20 * 2**10
    # A request refused before its body is read (429, or 413 from its Content-Length) has
    # up to this much of its body read and dropped, for up to drain_s seconds, before the
    # answer: clients that send all of a body before they read (Python's urllib and
    # requests) otherwise had the connection reset and never saw the status or its reason.
    drain_bytes: int = 32 * 2**20
    drain_s: float = 5.0
    batch_size: int = 16  # images per forward pass
    batch_wait_ms: float = 5.0  # how long a request waits for others to batch with
    top_k: int = 5  # classes per level in an answer
    explain_threads: int = 2  # Grad-CAMs computed at once (each uses every core); more wait
    # Pixels decoded at once, counted from each image's header (two images at the default
    # budget, about 1.5 GB); more wait their turn, small ones passing large ones by. A file
    # of more bytes than pixels (padded) holds its bytes: each is read in its turn.
    decode_pixels: int = 2 * MAX_PIXELS

    def __post_init__(self) -> None:
        _check_types(self)
        # (0 in flight would refuse every request)
        for name in ("max_bytes", "max_in_flight", "max_files", "batch_size", "top_k",
                     "explain_threads", "decode_pixels"):
            _check(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        _check(self.timeout_s > 0, "timeout_s", "a positive number of seconds", self.timeout_s)
        _check(self.upload_idle_s > 0, "upload_idle_s", "a positive number of seconds",
               self.upload_idle_s)
        _check(self.drain_bytes >= 0, "drain_bytes", "0 or more bytes", self.drain_bytes)
        _check(self.drain_s >= 0, "drain_s", "0 or more seconds", self.drain_s)
        _check(self.min_upload_rate >= 0, "min_upload_rate", "0 or more bytes a second",
               self.min_upload_rate)
        _check(self.batch_wait_ms >= 0, "batch_wait_ms", "0 or more", self.batch_wait_ms)


@settings
class AuditConfig:
    """What `data audit` looks for: likely label errors and near-duplicates."""

    # Frozen features: one backbone or several, comma-separated, side by side. auto:
    # AUDIT_BACKBONES, or with a run or model as the weights its own backbone.
    backbone: str = "auto"
    weights: str = "auto"
    device: str = "auto"
    batch_size: int = BATCH_SIZE
    folds: int = 5  # out-of-fold probabilities: each image scored by a head that never saw it
    # The logistic head's inverse regularisation (scikit-learn's C), on unit-length
    # features (each dimension ~0.03): of 1, 10, 30 and 100, 10 found most deliberate
    # label flips on Leeds and iNat (docs/performance.md).
    c: float = 10.0
    seed: int = 0
    # Near-duplicates: perceptual hashes at most this many bits apart of 64 (a resized or
    # re-encoded copy), or features at least this cosine-similar (copies of real photos
    # measured 0.90-0.995; the closest distinct Leeds photos 0.93)
    hash_distance: int = 6
    duplicate_similarity: float = 0.96
    duplicates_per_image: int = 10  # an image's closest partners listed (all: its group)
    gallery: int = 60  # suspect images shown in audit.html
    cache: bool = True  # keep each image's features in the cache dir for the next audit
    # Below this out-of-fold accuracy the head is too weak for cleanlab's flags to single
    # out wrong labels, and the audit says so. 5% of the labels flipped
    # (bench/audit_flips.py, 3 seeds; accuracy of the labels as given, flips included):
    # Leeds 0.94 (4% flagged, 98% of them flips), iNat 0.85 (5%, 71%); synthetic
    # butterflies (Lite0): 30 species of 60 images 0.71 (15% flagged, 26% of them flips),
    # of 30 images 0.64 (20%, 22%), of 9 images 0.48 (40%, 10%); 100 of 30 images 0.52
    # (30%, 14%); 300 of 9 images 0.22 (66%, 7%).
    weak_checker: float = 0.75

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.folds >= 2, "folds", "at least 2", self.folds)
        _check(0 <= self.hash_distance <= 64, "hash_distance", "0 to 64 bits",
               self.hash_distance)
        _check(self.c > 0, "c", "a positive number", self.c)
        _check(0 < self.duplicate_similarity <= 1, "duplicate_similarity", "in (0, 1]",
               self.duplicate_similarity)
        _check(self.duplicates_per_image >= 1, "duplicates_per_image", "at least 1",
               self.duplicates_per_image)
        _check(0 <= self.weak_checker <= 1, "weak_checker", "from 0 to 1", self.weak_checker)
        _check(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        _check(self.gallery >= 0, "gallery", "0 or more", self.gallery)
        _check_device(self)
        names = self.backbone.split(",")
        _check(all(n.strip() for n in names), "backbone", "one name or several, comma-"
               "separated", self.backbone)
        _check(len(names) == 1 or self.weights.lower() in ("auto", "none"), "backbone",
               f"one name with weights {self.weights!r} (they are one backbone's)",
               self.backbone)


@settings
class AdaptConfig:
    """`wingspan adapt`: self-training the head on unlabelled photos from where the model
    will be used. Measured on Leeds -> iNat field photos (docs/performance.md); the
    settings were chosen on one run's figure and hold on the seven others."""

    # Label spreading over the k-nearest-neighbour graph of the run's training images and
    # the photos: k, and how much a photo takes from its neighbours (scikit-learn's alpha).
    # k 5-15 and alpha 0.6-0.99 all scored within a point of these.
    neighbours: int = 7
    spreading: float = 0.8
    # A photo is trained on when the head's class is the one its neighbours give it and
    # the head gives it at least this probability: the calibrated one predict shows (the
    # finest level's logits over the run's temperature) in the first round, each refit's
    # own after. 0: agreeing is enough (0.5 and 0.7, measured on the head's softmax before
    # the temperature, kept fewer right photos and lost 1 and 4 points).
    confidence: float = 0.0
    rounds: int = 1  # refits, the head's class taken afresh each time (2-3: not kept, docs/)
    c: float = 1.0  # the logistic head's inverse regularisation (scikit-learn's C)
    device: str = "auto"
    precision: str = "auto"  # of the passes that compute the photos' features, as predict's
    runtime: str = "auto"
    batch_size: int = BATCH_SIZE

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.neighbours >= 1, "neighbours", "at least 1, e.g. 7", self.neighbours)
        _check(0 < self.spreading < 1, "spreading", "above 0 and below 1, e.g. 0.8",
               self.spreading)
        _check(0 <= self.confidence < 1, "confidence", "from 0 to below 1, e.g. 0.5",
               self.confidence)
        _check(self.rounds >= 1, "rounds", "at least 1", self.rounds)
        _check(self.c > 0, "c", "a positive number", self.c)
        _check_engines(self)
        _check_device(self)
        _check(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)


@settings
class SplitConfig:
    """A grouped, stratified train/val/test split and the sampling of its train part."""

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    max_per_class: int | None = None  # undersampling cap on train images per class
    oversample_to: int | None = None  # repeat rare train classes up to this many images

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            _check(0 <= v < 1, name, "a fraction in [0, 1)", v)
        _check(
            self.val_fraction + self.test_fraction < 1,
            "val_fraction + test_fraction",
            "below 1 so that something is left to train on",
            self.val_fraction + self.test_fraction,
        )
        if self.max_per_class is not None:
            _check(self.max_per_class >= 1, "max_per_class", "at least 1", self.max_per_class)
        if self.oversample_to is not None:
            _check(self.oversample_to >= 1, "oversample_to", "at least 1", self.oversample_to)
        if self.max_per_class and self.oversample_to:
            _check(
                self.oversample_to <= self.max_per_class,
                "oversample_to",
                f"at most {another('max_per_class')} ({self.max_per_class})",
                self.oversample_to,
            )


@settings
class AugmentConfig:
    """On-the-fly augmentation for training, and the evaluation transform."""

    policy: str = "standard"  # light | standard | strong | field
    image_size: int = 224
    eval_crop: float = 0.875  # resize to size / crop, then centre-crop `size` (timm's default)

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.policy in AUGMENT_POLICIES, "policy",
               f"one of {', '.join(AUGMENT_POLICIES)}", self.policy)
        _check(self.image_size >= 16, "image_size", "at least 16 pixels", self.image_size)
        _check(0 < self.eval_crop <= 1, "eval_crop", "a fraction in (0, 1]", self.eval_crop)


@settings
class DemoConfig:
    """The synthetic butterfly dataset that `make demo` and the tests use."""

    image_size: int = 96
    images_per_class: tuple[int, ...] = (60, 50, 40, 32, 26, 20)  # imbalanced on purpose
    seed: int = 0
    # The demo's training run: an offline backbone, small enough for ~1 minute on 2 cores.
    backbone: str = "efficientnet_lite0"
    epochs_head: int = 20
    epochs_finetune: int = 2
    feature_views: int = 1

    def __post_init__(self) -> None:
        _check_types(self)
        _check(
            1 <= len(self.images_per_class) <= DEMO_SPECIES,
            "images_per_class",
            f"one count per class, for 1 to {DEMO_SPECIES} classes",
            self.images_per_class,
        )
        _check(min(self.images_per_class) >= 1, "images_per_class", "counts >= 1",
               self.images_per_class)
        # As small as training takes (TrainConfig's own floor): the demo trains on them.
        # At most data preview's cap: drawn one by one, 5000 px wrote 7 images in 5 min.
        _check(16 <= self.image_size <= 1024, "image_size", "16 to 1024 pixels",
               self.image_size)
        # (before the data is made: training refused them only at the demo's 5th step)
        for name in ("epochs_head", "epochs_finetune"):
            _check(getattr(self, name) >= 0, name, "0 or more", getattr(self, name))
        _check(self.feature_views >= 1, "feature_views", "at least 1", self.feature_views)


@settings(frozen=True)
class EngineConfig:
    """How `auto` picks the engine for a pass by timing the candidates on this machine
    (wingspan.models.engine). Measured once per model and machine, then cached."""

    # Images per timed call: the pass's batch size, up to this. Not fewer: bf16 ran
    # EfficientNet-Lite2 at 75 images/s on batches of 12 but 30-47 on batches of 64, where
    # ONNX Runtime kept 65, so a small timing batch picked the slower engine (2-core EPYC).
    timing_images: int = 64
    rounds: int = 2  # timed calls per candidate, after a warm-up; the candidates take turns
    near_tie: float = 1.25  # after round 1, only candidates this close to the best go on
    # A lossy candidate (bf16, fp16) is kept only when this much faster than the fastest
    # fp32 one: bf16 moves a probability by up to 0.04, and a near tie (1578 against 1561
    # images/s) went one way or the other from one timing to the next, and a same-seed
    # rerun's model with it.
    lossy_gain: float = 1.05
    # A timing during which this process's threads waited for a core (other work held it)
    # more than this share of the time is used for the run at hand but not kept: beside
    # other jobs on a 2-core AMX Xeon, ResNet-50 ran 6x slower in bf16 but 2x in ONNX
    # Runtime, and the pick flipped, so such figures say more of the load than of the
    # engines (an idle machine waited 0%; two busy processes beside it, 49%).
    max_core_wait: float = 0.2
    # Accuracy guard: a candidate may not be chosen when, on more than `max_changed` of the
    # timing images, its features point elsewhere than fp32's (cosine below
    # `min_feature_cosine`; bf16 gave >= 0.997) or its top-1 class differs from fp32's where
    # fp32's top-1 leads its runner-up by more than `top1_margin` in probability (a closer
    # race may flip either way, and a new run's head is still random); or when it gives NaN.
    max_changed: float = 0.1
    min_feature_cosine: float = 0.99
    top1_margin: float = 0.02
    # A trained model's predictions leave out a lossy engine (bf16, fp16) that, at the end
    # of training, answered otherwise than fp32 on more than this share of up to
    # `answer_check_images` val images (training.lossy_check): the timing's guard above
    # sees synthetic images and, at a run's start, an untrained head.
    max_answers_changed: float = 0.01
    answer_check_images: int = 256
    cache_file: str = "engines.json"  # under default_cache_dir()


# Force the engine for every `auto` in this process (tests run under each; see Makefile).
PRECISION_ENV, RUNTIME_ENV = "WINGSPAN_PRECISION", "WINGSPAN_RUNTIME"


def setting_text(value) -> str:
    """A setting's value as config.yaml spells it, for a reader: true, null, a list
    comma-separated as its option takes it (not Python's None or ['a', 'b'])."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def to_dict(config: object) -> dict:
    """A config as plain JSON-ready values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


def shared_data_dir() -> Path:
    """Where the real photo sets live: $WINGSPAN_SHARED_DATA, else ../shared/data."""
    env = os.environ.get("WINGSPAN_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def default_cache_dir() -> Path:
    """Decoded images and other reusable work: $WINGSPAN_CACHE, else ~/.cache/wingspan."""
    env = os.environ.get("WINGSPAN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wingspan"


# What a resume may change: where and how the run computes, not what it learns.
MACHINE_SETTINGS = ("device", "devices", "nodes", "strategy", "workers", "compile")
# All the TrainConfig settings that change where or how fast a run computes, or what it
# keeps on disk, not what it learns: a resumed run's may differ (the engines' by
# $WINGSPAN_PRECISION, say), and `wingspan runs` does not tell runs apart by them.
NOT_LEARNT = (*MACHINE_SETTINGS, "precision", "runtime", "cache_dir", "checkpoint_minutes",
              "profile", "keep_feature_cache", "reuse_features")


@settings
class TrainConfig:
    """The two-stage transfer-learning recipe. Saved, resolved, in every run."""

    # data
    level: str | None = None  # label level to learn (default: the finest)
    levels: list[str] | None = None  # several levels (coarse to fine), one head each
    level_weights: list[float] | None = None  # loss weight per level (default: all 1)
    rare_below: int = 0  # finest classes with fewer training images learn their parent only
    max_per_class: int | None = None  # undersample the training split
    # Given splits that put one group, file or picture on two sides are refused (ETHEC's
    # published ones are repaired); True trains on them anyway, with a warning.
    allow_leaky_splits: bool = False
    # used only when the data has no split of its own, as `data split` makes one
    val_fraction: float = SplitConfig.val_fraction
    test_fraction: float = SplitConfig.test_fraction
    # Honest scores. The best epoch is chosen on val, so val's score is optimistic; only a
    # split never used to choose scores the model fairly. holdout: data with its own val
    # but no test keeps that val as the test split and chooses on val_fraction of train
    # carved out for it. val: choose on the data's val (no unbiased score for such data).
    selection: str = "holdout"
    # Classes left out of training and scored as unknowns at the end (the open-set check
    # without a second dataset): their images are in no split.
    holdout_classes: list[str] | None = None
    # model
    # auto: DEFAULT_BACKBONE when its ImageNet weights resolve (cached, installed or
    # downloadable), else the first of OFFLINE_BACKBONES whose weights are installed.
    backbone: str = "auto"
    weights: str = "auto"  # auto | none | a file
    hidden: int | None = None
    dropout: float = 0.2
    image_size: int | None = None  # None: the backbone's own input size
    # stage 1: the head on a frozen backbone
    epochs_head: int = 30  # cheap: the head trains on cached features
    lr: float = 3e-3  # the head's learning rate; stage 2 derives its rates from it
    # Augmented views per training image in the feature cache, beside the clean one. One
    # cost 30% less caching than two and did as well (iNat, Lite0: head 0.893 against 0.880
    # val macro-F1, after fine-tuning 0.911 against 0.909).
    feature_views: int = 1
    feature_cache: bool = True  # False runs the frozen backbone on every batch
    # RUN/cache (the features of every training and val image) once the run is done: only
    # a resume reads it, and it took about 380 MB a run for Lite0 at ETHEC's size.
    keep_feature_cache: bool = False
    # Each image's stage-1 features also under the cache folder's features/, where a later
    # run on the same images with the same backbone, engine and augmentation finds them
    # (training.shared_features): only the head and fine-tuning settings changed, its
    # feature cache is read, not computed.
    reuse_features: bool = True
    # stage 2: fine-tune the last stages
    epochs_finetune: int = 4
    unfreeze: int | None = None  # None: the backbone's default
    # Stage 2's top rate = lr * this. 0.3 gained on every split seed against 0.1 (iNat
    # test macro-F1 +0.011 to +0.029 over seeds 0-3, Leeds -> iNat +0.017 and +0.006;
    # bench/levers.py, docs/performance.md), for the same training time.
    finetune_lr_scale: float = 0.3
    train_bn: bool = False  # unfrozen BatchNorm layers use batch statistics (see Backbone)
    layer_decay: float = 0.5  # each earlier stage's rate is this times the next one's
    warmup_fraction: float = 0.1  # of stage 2 steps
    weight_decay: float = 0.01
    # both stages
    # timm's optimizer (`timm.optim.list_optimizers()`: adamw, sgd, lamb, ...); whichever,
    # biases and norm layers get no weight decay
    optimizer: str = "adamw"
    batch_size: int = BATCH_SIZE
    augment: str = "standard"  # light | standard | strong | field
    class_weights: str = "auto"  # auto (balanced when imbalanced) | balanced | none
    imbalance_threshold: float = 1.5  # auto turns class weights on above this max/min ratio
    # The largest class weight, as a multiple of the commonest class's: balanced weights
    # would count a species of 1 training image beside one of 50 as 50 images (see
    # training.prepare.weigh_classes). 0: no cap.
    max_class_weight: float = 10.0
    sampler: str = "shuffle"  # shuffle | weighted (by the class weights, capped alike)
    label_smoothing: float = 0.1
    patience: int = 8  # epochs without a better val macro-F1 before stopping a stage
    # At an equal val macro-F1, a val loss lower by at least this is better (Keras'
    # min_delta); less would be noise, and an epoch that changes nothing must count
    # against patience.
    min_delta: float = 1e-3
    seed: int = 0
    # machine (a resumed run may change these)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    devices: int | None = None  # processes (GPUs) per machine; None: as torchrun set, else 1
    nodes: int | None = None  # machines; None: as torchrun set, else 1
    strategy: str = "auto"  # auto | ddp (wingspan.parallel)
    compile: bool = False  # torch.compile the fine-tuned part of the model
    precision: str = "auto"  # auto (measured) | fp32 | bf16 | fp16; or $WINGSPAN_PRECISION
    runtime: str = "auto"  # frozen-weight passes: auto | torch | onnx; or $WINGSPAN_RUNTIME
    workers: int | None = None  # None: sized to the machine
    cache_dir: str | None = None  # decoded-image cache (None: default_cache_dir())
    checkpoint_minutes: float = 5.0  # also checkpoint inside long epochs (0: every step)
    strict: bool = False  # an unreadable image stops training instead of being skipped
    profile: bool = False  # write a torch.profiler trace of a few fine-tuning steps
    # "unknown": the score (one of UNKNOWN_SCORES; the bundle holds them all) and the share
    # of known val images it may turn away, which sets its threshold
    unknown_score: str = "msp+knn"
    unknown_rate: float = 0.05

    def __post_init__(self) -> None:
        if self.weights is None:  # Keras' meaning, in Python: random weights (a config
            self.weights = "none"  # file's blank is refused before, as a slip)
        _check_types(self)
        self.optimizer = self.optimizer.lower()  # (timm's names: "AdamW" is adamw)
        for name in ("epochs_head", "epochs_finetune", "feature_views", "seed"):
            _check(getattr(self, name) >= 0, name, "0 or more", getattr(self, name))
        # (each view of every training image is cached: 64 is 64x the cache already)
        _check(self.feature_views <= MAX_FEATURE_VIEWS, "feature_views",
               f"at most {MAX_FEATURE_VIEWS}", self.feature_views)
        # 1 stops a stage at its first epoch without a better score (Keras's patience 0)
        _check(self.patience >= 1, "patience", "at least 1", self.patience)
        _check(self.epochs_head + self.epochs_finetune > 0, "epochs_head + epochs_finetune",
               "at least 1", self.epochs_head + self.epochs_finetune)
        for name in ("lr", "finetune_lr_scale", "layer_decay"):
            _check(getattr(self, name) > 0, name, "a positive number", getattr(self, name))
        # AdamW's update is about lr in size: 10 or more is no learning rate, and overflows.
        _check(self.lr < 10, "lr", "below 10 (3e-3 is the default)", self.lr)
        _check(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        _check(0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        _check(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)",
               self.label_smoothing)
        _check(0 <= self.warmup_fraction < 1, "warmup_fraction", "in [0, 1)",
               self.warmup_fraction)
        _check(self.weight_decay >= 0, "weight_decay", "0 or more", self.weight_decay)
        if self.optimizer != TrainConfig.optimizer:  # (timm imported only to check another)
            _check(_optimizer_runs(self.optimizer), "optimizer",
                   "one of timm's optimizers that runs here (adamw, sgd, lamb, ...: "
                   "timm.optim.list_optimizers(); not apex's fused*, bitsandbytes' bnb* or "
                   "adahessian, which needs a second-order backward)", self.optimizer)
        _check(self.min_delta >= 0, "min_delta", "0 or more", self.min_delta)
        _check(self.augment in AUGMENT_POLICIES, "augment",
               f"one of {', '.join(AUGMENT_POLICIES)}", self.augment)
        _check(self.class_weights in ("auto", "balanced", "none"), "class_weights",
               "one of auto, balanced, none", self.class_weights)
        _check(self.sampler in ("shuffle", "weighted"), "sampler", "shuffle or weighted",
               self.sampler)
        _check(self.selection in ("holdout", "val"), "selection", "holdout or val",
               self.selection)
        _check_engines(self)
        _check_device(self)
        _check(self.strategy in STRATEGIES, "strategy", f"one of {', '.join(STRATEGIES)}",
               self.strategy)
        if self.unfreeze is not None:
            _check(self.unfreeze >= 0, "unfreeze", "0 or more stages", self.unfreeze)
        if self.max_per_class is not None:
            _check(self.max_per_class >= 1, "max_per_class", "at least 1", self.max_per_class)
        if self.image_size is not None:
            _check(self.image_size >= 16, "image_size", "at least 16 pixels", self.image_size)
        if self.workers is not None:
            _check(self.workers >= 0, "workers", "0 or more", self.workers)
        for name in ("devices", "nodes"):
            if getattr(self, name) is not None:
                _check(1 <= getattr(self, name) <= MAX_PROCESSES, name,
                       f"1 to {MAX_PROCESSES}", getattr(self, name))
        SplitConfig(val_fraction=self.val_fraction, test_fraction=self.test_fraction)
        if self.levels is not None:
            _check(len(self.levels) >= 1 and len(set(self.levels)) == len(self.levels),
                   "levels", "distinct level names", self.levels)
            # A run with several levels predicts the finest: a level outside them would be
            # dropped without a word.
            _check(self.level is None or self.level in self.levels, "level",
                   f"one of levels {', '.join(self.levels)} (the finest is predicted), or "
                   "left out",
                   self.level)
        if self.level_weights is not None:  # (without levels: said so, not "one per entry")
            _check(self.levels is not None, "level_weights",
                   f"given with {another('levels')}, one weight per level (e.g. --levels "
                   "genus,species --level-weights 1,2)",
                   self.level_weights)
            _check(len(self.level_weights) == len(self.levels), "level_weights",
                   f"one weight per entry of {another('levels')} ({len(self.levels)}: "
                   f"{', '.join(self.levels)})",
                   self.level_weights)
            _check(all(w >= 0 for w in self.level_weights) and sum(self.level_weights) > 0,
                   "level_weights", "non-negative with a positive sum", self.level_weights)
        _check(self.rare_below >= 0, "rare_below", "0 or more", self.rare_below)
        # A rare class learns its parent level instead: with one level there is none.
        _check(not self.rare_below or len(self.levels or []) >= 2, "rare_below",
               f"0 unless {another('levels')} names several (e.g. --levels genus,species)",
               self.rare_below)
        if self.hidden is not None:
            _check(self.hidden >= 1, "hidden", "at least 1 unit (or none: no hidden layer)",
                   self.hidden)
        _check(self.checkpoint_minutes >= 0, "checkpoint_minutes",
               "0 (after every step) or more", self.checkpoint_minutes)
        _check(self.max_class_weight == 0 or self.max_class_weight >= 1, "max_class_weight",
               "1 or more (a multiple of the commonest class's weight), or 0 for no cap",
               self.max_class_weight)
        _check(self.imbalance_threshold >= 1, "imbalance_threshold",
               "1 or more (a largest-to-smallest class ratio)", self.imbalance_threshold)
        _check(self.unknown_score in UNKNOWN_SCORES, "unknown_score",
               f"one of {', '.join(UNKNOWN_SCORES)}", self.unknown_score)
        _check(0 < self.unknown_rate < 1, "unknown_rate", "above 0 and below 1, e.g. 0.05",
               self.unknown_rate)

    def stages_to_unfreeze(self, backbone_default: int) -> int:
        """How many of the backbone's last stages fine-tuning trains: `unfreeze`, else the
        backbone's own default (its spec's: 3 of EfficientNet's, say)."""
        return backbone_default if self.unfreeze is None else self.unfreeze

    @property
    def trained_levels(self) -> list[str]:
        """The levels with a head: `levels`, else the single `level`."""
        return list(self.levels) if self.levels else [self.level]

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> TrainConfig:
        """Settings from a YAML file, then `overrides` (command-line values win)."""
        import yaml

        try:  # (read from the open file: YAML's messages name it, not "<byte string>")
            with open(path, "rb") as f:
                values = yaml.load(f, Loader=_strict_loader()) or {}
        except OSError as e:  # (not "[Errno 2] No such file or directory: 'c.yaml'")
            raise WingspanError(f"Cannot read the config file {path}: {e.strerror or e}.",
                                hint="Check the path given to --config (config= in "
                                     "Python).") from e
        except yaml.YAMLError as e:
            raise WingspanError(f"Cannot read the config file {path}: {e}", hint=(
                f"Save it as UTF-8 text, e.g. `iconv -f CODE_PAGE -t utf-8 {path} > NEW.yaml`, "
                f"{CODE_PAGES} (a comment or value with an accent, saved in a Windows "
                "encoding)."
                if isinstance(e, yaml.reader.ReaderError) and e.encoding != "unicode"
                else "Mend it at the line above: one `setting: value` a line, each setting "
                     "once, e.g. `epochs_head: 10`.")) from e  # (not a control character)
        if not isinstance(values, dict):
            raise WingspanError(f"{path} must hold a mapping of setting: value.")
        fields = list(cls.__dataclass_fields__)
        unknown = sorted(set(values) - set(fields), key=str)
        check_not_options(unknown, f"{path}: ", "a config file")
        if unknown:
            close = {k: closest_settings(k, fields) for k in unknown}
            meant = [f"'{k}' -> '{c[0]}'" for k, c in close.items() if c]
            said = ", ".join(f"'{k}'" for k in unknown)  # (not Python's ['a', 'b'])
            raise WingspanError(f"{path}: unknown setting{'s' * (len(unknown) > 1)} {said}.",
                                hint=(f"Did you mean {', '.join(meant)}? " if meant else "")
                                + f"Valid: {', '.join(fields)}.")
        if "weights" in values and values["weights"] is None and "weights" not in overrides:
            raise WingspanError(f"{path}: 'weights' is empty (YAML reads a blank or null as "
                                "no value).",
                                hint="Write `weights: none` for random weights, `weights: "
                                     "auto` for ImageNet's, or a weights file.")
        levels = overrides.get("levels")
        if levels:  # given: the file's level and level weights were for its own levels
            levels = comma_list(levels) if isinstance(levels, str) else list(levels)
            if "level" not in overrides and values.get("level") not in levels:
                values.pop("level", None)
            if "level_weights" not in overrides and values.get("levels") != levels:
                values.pop("level_weights", None)
        try:
            return cls(**{**values, **overrides})
        except SettingError as e:  # a value the file gave: the file is named, as for a key
            from_file = set(values) - set(overrides)
            if any(part in from_file for setting, _ in e.problems
                   for part in re.findall(r"\w+", setting)):
                e.intro = f"{path}: {e.intro}"
                e.message = e.worded({})
                e.args = (e.message,)
            raise


# Options of `wingspan train` that are not settings (what it reads and where it writes):
# a config file that holds one is told where it goes.
COMMAND_OPTIONS = {"format": "--format", "group_regex": "--group-regex",
                   "max_pixels": "--max-pixels", "name": "--name", "runs_dir": "--runs-dir",
                   "resume": "--resume", "config": "--config", "quiet": "--quiet",
                   "data": "DATA"}


def check_not_options(keys, where: str, holder: str) -> None:
    """A WingspanError for `keys` that are options of `wingspan train` (COMMAND_OPTIONS), not
    settings: said as such, not "did you mean" a setting that sounds alike (max_pixels is
    not max_per_class). `holder` "a config file" or "a TrainConfig" (Python's)."""
    if options := [k for k in keys if k in COMMAND_OPTIONS]:
        python = ("ws.read(DATA, format=..., group_regex=...), "
                  "ws.train(..., name=..., runs_dir=..., max_pixels=...)")
        raise WingspanError(
            f"{where}{', '.join(map(repr, options))} "
            + ("is an option" if len(options) == 1 else "are options")
            + f" of the command, not a setting {holder} holds.",
            hint=f"Give {', '.join(COMMAND_OPTIONS[k] for k in options)} on the command "
                 f"line (in Python: {python})." if holder == "a config file" else
                 f"In Python {'it is an argument' if len(options) == 1 else 'they are arguments'}"
                 f" of its own: {python}" + (", ws.resume(RUN)" if "resume" in options else "")
                 + ".")


def name_pairs(items: list[str], option: str) -> dict[str, str]:
    """["a=b", "c=d,e=f"] -> {"a": "b", "c": "d", "e": "f"}: a class map as the CLI's
    --map and the library's class_map give it (`option` names it in errors). A text is
    split at its commas, and a part without "=" belongs to the pair before it:
    "a=red,admiral,b=c" maps a to the class "red,admiral" (a class folder may hold a
    comma); a name holding "=" is read up to its first "=" on the left."""
    def pairs_in(text: str) -> list[str]:
        pairs: list[str] = []
        for part in (part for part in text.split(",") if part.strip()):
            if "=" in part or not pairs:
                pairs.append(part)
            else:
                pairs[-1] += "," + part
        return [pair.strip() for pair in pairs if pair.strip()]

    pairs = {}
    for item in (item for text in items for item in pairs_in(text)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise WingspanError(f"{option} {item!r}: expected NAME=NAME.",
                                hint=f"For example {option} admiral=red_admiral.")
        key, value = key.strip(), value.strip()
        if pairs.get(key, value) != value:
            raise WingspanError(f"{option} gives {key} twice ({key}={pairs[key]} and "
                                f"{key}={value}).", hint="Give each name once.")
        pairs[key] = value
    return pairs


def no_such_score(name: str, fitted: list[str]) -> WingspanError:
    """--unknown-score NAME of predict, evaluate, calibrate and export that is none of the
    model's (a typo, said with the closest; or a score its wingspan had not yet)."""
    if name in UNKNOWN_SCORES:
        return WingspanError(f"This model has no unknown score '{name}' (it was made before "
                             "wingspan had it).",
                             hint="`wingspan calibrate RUN --unknown` fits them all again; "
                                  f"or choose one of: {', '.join(fitted)}.")
    close = difflib.get_close_matches(name.lower(), fitted, n=1, cutoff=0.5)
    return WingspanError(f"No unknown score '{name}'.",
                         hint=(f"Did you mean '{close[0]}'? " if close else "")
                         + f"Choose one of: {', '.join(fitted)}.")
