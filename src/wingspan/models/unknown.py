""""None of the species I know": out-of-distribution scores on a model's pooled features
and logits, fitted when a run finishes, and each level's threshold.

A score is higher the less an image looks like the training data (pytorch-ood's sign).
MSP, energy and kNN are scored by the same tensor operations in PyTorch and in an exported
graph (the `_*Graph` modules): pytorch-ood's detectors, which they follow, find kNN with
scikit-learn's index, which no graph can hold, and importing pytorch-ood took 1.5 s of
every predict's start (scipy.stats, for a detector we do not use).
The threshold is the score that `rate` of the known val images exceed, so about that
share of known images is turned away: the rate is the price, stated up front. With
several levels, an image is named at the finest only when it passes every level, so the
levels' thresholds are set together (`level_thresholds`): the rate is the share of known
images not named down to the finest level, not each level's.

Every score below is fitted and stored in the bundle (a few MB), so `predict` and
`evaluate` can use another one without retraining; the manifest names the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from wingspan.config import no_such_score
from wingspan.errors import WingspanError

UNKNOWN = "unknown"  # the answer for an image that passes no level's threshold
PREFIX = "unknown."  # bundle tensors of the fitted scores: unknown.<score>.<level>.<name>
# Fitting and the kNN bank use at most this many training images (a fixed random subset):
# enough for a covariance of a 2048-wide feature, and a bank that keeps bundles small.
MAX_FIT_IMAGES = 5000
# How far below a val score the combined score's share steps up (`_steps`): well over the
# float32 rounding by which engines differ (1e-7), well under the gaps between val scores.
STEP_SLACK = 1e-5
# The manifest's mark of a bundle whose combined shares step just below val scores (since
# 2026-12-06); one without it keeps the rule its thresholds were set with.
STEPPED = {"shares_step": "below_val"}
# The k-th nearest training image's distance. pytorch-ood's default of 50 needs more images
# per class than most users have; with held-out iNat species, AUROC rose as k fell (10 -> 3:
# +0.004 to +0.019 on all six runs, docs/performance.md), but at k 1 a non-butterfly
# slipped through.
KNN_K = 3
KNN_K_UNSTORED = 10  # what a bundle that does not store its k was fitted with
# A combined score's tie-break: a z-score term between 0 and twice this keeps images beyond
# every val image in order; the sum is scaled back into [0, 1], a share's range.
TIE_BREAK = 1e-3


class Score:
    """One level's score: fitted on training features, logits and labels."""

    uses_labels = True  # False: the same for every level (fitted once)

    def fit(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
            temperature: float) -> Score:
        return self

    def __call__(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load(self, tensors: dict[str, torch.Tensor], temperature: float) -> Score:
        return self

    def graph(self) -> nn.Module:
        """The fitted score as a module of tensor operations only, (features, logits) ->
        score, for an exported model (`wingspan export`)."""
        raise NotImplementedError


class _MspGraph(nn.Module):
    def __init__(self, t: float):
        super().__init__()
        self.t = float(t)

    def forward(self, features, logits):
        return 1.0 - torch.softmax(logits.float() / self.t, -1).max(-1).values


class _EnergyGraph(nn.Module):
    def forward(self, features, logits):
        return -torch.logsumexp(logits.float(), -1)


class _MahalanobisGraph(nn.Module):
    def __init__(self, means: torch.Tensor, precision: torch.Tensor):
        super().__init__()
        # fp32, the precision folded in ahead: x'Px - 2 x'Pm + m'Pm
        self.register_buffer("precision", precision.float())
        self.register_buffer("pm", (means @ precision).float().T.contiguous())
        self.register_buffer("mpm", ((means @ precision) * means).sum(1).float())

    def forward(self, features, logits):
        x = features.float()
        d = ((x @ self.precision) * x).sum(-1, keepdim=True) - 2 * x @ self.pm + self.mpm
        return d.min(-1).values


class _KnnGraph(nn.Module):
    """pytorch-ood's kNN distance (Euclidean, between unit vectors), which it finds with
    scikit-learn's index, as a matrix product: |a - b|^2 = 2 - 2 a.b for unit vectors."""

    def __init__(self, bank: torch.Tensor, k: int):
        super().__init__()
        # fp32: an exporter folds any cast of a constant, so fp16 would not stay smaller.
        self.register_buffer("bank", _unit(bank.float()).T.contiguous())
        self.k = k
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # see _LevelsGraph

    def forward(self, features, logits):
        last = self.last  # (read once: a server's threads score through this module)
        if last is not None and last[0] is features:  # shared by several levels
            return last[1]
        similarity = _unit(features.float()) @ self.bank
        kth = similarity.topk(self.k, -1).values[..., -1]
        score = (2.0 - 2.0 * kth).clamp_min(0.0).sqrt()
        self.last = (features, score)
        return score


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class MaxSoftmax(Score):
    """1 - the calibrated top probability (Hendrycks & Gimpel 2017): free, and good at
    telling confused knowns, weak on far-away images the network is sure about. (A
    taxonomy model's, in bundles that say "msp": "branch", is `branch_shares`' instead.)"""

    def fit(self, features, logits, labels, temperature):
        self.t = temperature
        return self

    def load(self, tensors, temperature):
        self.t = temperature
        return self

    def __call__(self, features, logits):
        return _MspGraph(self.t)(features, logits)

    def graph(self):
        return _MspGraph(self.t)


class Energy(Score):
    """-logsumexp(logits) (Liu et al. 2020): MSP's logits before the softmax squashes
    them, so a confidently wrong image stands out less often."""

    def __call__(self, features, logits):
        return _EnergyGraph()(features, logits)

    def graph(self):
        return _EnergyGraph()


class Mahalanobis(Score):
    """Distance to the nearest class mean under one shared covariance (Lee et al. 2018).
    Written here rather than taken from pytorch-ood, whose unshrunk inverse is singular
    whenever there are fewer images than feature channels (most users' data); Ledoit-Wolf
    shrinkage keeps it invertible."""

    def fit(self, features, logits, labels, temperature):
        from sklearn.covariance import LedoitWolf
        x = features.double()
        classes = torch.unique(labels)
        self.means = torch.stack([x[labels == c].mean(0) for c in classes])
        centred = x - self.means[torch.searchsorted(classes, labels.contiguous())]
        self.precision = torch.from_numpy(
            LedoitWolf(assume_centered=True).fit(centred.numpy()).precision_)
        return self

    def tensors(self):
        # The precision is symmetric: its upper triangle alone, half the bytes (16.8 MB a
        # level for a 2048-wide ResNet-50 feature otherwise).
        rows, cols = torch.triu_indices(*self.precision.shape)
        return {"means": self.means.float(),
                "precision_triu": self.precision[rows, cols].float()}

    def load(self, tensors, temperature):
        self.means = tensors["means"].double()
        if "precision" in tensors:  # a bundle written before the triangle was kept alone
            self.precision = tensors["precision"].double()
            return self
        width = self.means.shape[1]
        rows, cols = torch.triu_indices(width, width)
        self.precision = torch.zeros(width, width, dtype=torch.float64)
        self.precision[rows, cols] = tensors["precision_triu"].double()
        self.precision[cols, rows] = tensors["precision_triu"].double()
        return self

    def __call__(self, features, logits):
        # (x - m)' P (x - m) = x'Px - 2 x'Pm + m'Pm: no (images x classes x width) tensor
        x, pm = features.double(), self.means @ self.precision
        d = ((x @ self.precision) * x).sum(1, keepdim=True) - 2 * x @ pm.T \
            + (pm * self.means).sum(1)
        return d.min(1).values.float()

    def graph(self):
        return _MahalanobisGraph(self.means, self.precision)


class NearestNeighbour(Score):
    """Distance to the k-th nearest training image, both normalised (Sun et al. 2022; as
    pytorch-ood's KNN detector scores it): no assumption on the classes' shape."""

    uses_labels = False

    def fit(self, features, logits, labels, temperature):
        self.bank = features.float()
        self.k = min(KNN_K, len(self.bank))
        return self._index()

    def tensors(self):
        # The bank in half the bytes (distances move by ~1e-3), and the k that the val
        # threshold was set for, whatever KNN_K is when the bundle is read.
        return {"bank": self.bank.half(), "k": torch.tensor([self.k])}

    def load(self, tensors, temperature):
        self.bank = tensors["bank"].float()
        k = int(tensors["k"][0]) if "k" in tensors else KNN_K_UNSTORED
        self.k = min(k, len(self.bank))
        return self._index()

    def _index(self):
        self.index = _KnnGraph(self.bank, self.k)  # the bank normalised once
        return self

    def __call__(self, features, logits):
        return self.index(features, logits)

    def graph(self):
        return _KnnGraph(self.bank, self.k)


class Combined(Score):
    """The larger of several scores, each put in one unit first: the share of known val
    images it exceeds. MSP sees a near neighbour of a known species (a confused head),
    kNN an image far from every training image that the head is sure of anyway (a cat);
    each misses what the other sees. (A small z-score term keeps images beyond every val
    image in order; the sum is scaled back into [0, 1].)"""

    def __init__(self, parts: tuple[str, ...], stepped: bool = True):
        # `stepped`: shares step up just below each val score (`_steps`); a bundle written
        # before that (no STEPPED mark) keeps the rule its thresholds were set with, at
        # each val score, so that it answers as it did and as its exports do.
        self.parts, self.stepped = parts, stepped

    def fit_val(self, val: dict[str, np.ndarray]) -> Combined:
        self.val = {p: torch.as_tensor(np.sort(val[p])).double() for p in self.parts}
        return self._step()

    def tensors(self):
        return {f"val_{p}": v.float() for p, v in self.val.items()}

    def load(self, tensors, temperature):
        self.val = {p: tensors[f"val_{p}"].double() for p in self.parts}
        return self._step()

    def _step(self) -> Combined:
        self.steps = {p: _steps(v) if self.stepped else v  # (once, not per batch)
                      for p, v in self.val.items()}
        return self

    def combine(self, part_scores: dict[str, torch.Tensor]) -> torch.Tensor:
        units = []
        for p in self.parts:
            val, x = self.val[p], part_scores[p].double()
            share = torch.searchsorted(self.steps[p], x, right=not _constant(val)) / len(val)
            units.append(_in_unit(share, (x - val.mean()) / (_std(val) + 1e-12)))
        return torch.stack(units).max(0).values.float()

    def graph(self, parts: dict[str, nn.Module]) -> nn.Module:
        return _CombinedGraph(parts, self.val, self.steps)


class _CombinedGraph(nn.Module):
    """Combined.combine in tensor operations: the share of val scores an image's exceeds
    is the count of their steps (`_steps`) at or below it, / n."""

    def __init__(self, parts: dict[str, nn.Module], val: dict[str, torch.Tensor],
                 steps: dict[str, torch.Tensor]):
        super().__init__()
        self.parts = nn.ModuleList(parts.values())
        self.vals = nn.ParameterList([nn.Parameter(steps[p].float(), requires_grad=False)
                                      for p in parts])
        self.stats = [(float(val[p].mean()), float(_std(val[p])) + 1e-12) for p in parts]
        self.constant = [_constant(val[p]) for p in parts]

    def forward(self, features, logits):
        units = []
        for part, val, (mean, std), constant in zip(self.parts, self.vals, self.stats,
                                                     self.constant, strict=True):
            x = part(features, logits)
            share = ((val[None, :] < x[:, None]) if constant else
                     (val[None, :] <= x[:, None])).float().mean(-1)
            units.append(_in_unit(share, (x - mean) / std))
        return torch.stack(units).max(0).values


def _steps(val: torch.Tensor) -> torch.Tensor:
    """Where the share of (sorted) val scores an image exceeds steps up: just below each
    val score (STEP_SLACK), or halfway to the next lower one where that is nearer. A val
    image scored again lands on its own val score, which another engine computes a few
    rounding units lower (ONNX Runtime's softmax) or higher: at the score itself that
    moved its share, and with it its answer, by one val image; just below, it keeps the
    share its threshold was set with. (Halfway everywhere gave new images half a val
    image's share more on average, and turned away 0.5-1.1 points more known test images
    than the rate asked: docs/performance.md.) Constant scores keep theirs (`_constant`).
    Each step is a float32 value, as the exported graph holds it, rounded up: rounded to
    the nearest, one between two scores a float32 step apart fell on the lower score."""
    distinct = torch.unique(val)  # (sorted)
    if len(distinct) < 2:
        return val
    lower = torch.cat([2 * distinct[:1] - distinct[1:2], distinct[:-1]])
    halfway = (val + lower[torch.searchsorted(distinct, val)]) / 2
    wanted = torch.maximum(halfway, val - STEP_SLACK * (1 + val.abs()))
    steps = wanted.float()
    return torch.where(steps.double() < wanted,
                       torch.nextafter(steps, torch.full_like(steps, math.inf)), steps).double()


def _constant(val: torch.Tensor) -> bool:
    """Every val score the same (MSP at a level of one class: 0): that score tells no
    image from another, so an image equal to it exceeds no val image (share 0), rather
    than all of them (share 1, which left the combined score nothing but its tie-break)."""
    return bool(val.min() == val.max())


def _std(val: torch.Tensor) -> torch.Tensor:
    """The spread of the val scores: 0 for a single val image (torch's unbiased std is NaN
    there, which made every score NaN and the answer never "unknown")."""
    return val.std() if len(val) > 1 else val.new_zeros(())


def _in_unit(share: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A share of val images plus the tie-break, scaled into [0, 1] (the clamp only
    catches rounding: tanh reaches +-1 in floating point)."""
    tied = share + TIE_BREAK * (1.0 + torch.tanh(z / 10))
    return (tied / (1.0 + 2 * TIE_BREAK)).clamp(0.0, 1.0)


def _legacy_threshold(threshold: float) -> float:
    """A combined threshold from a bundle written before the scaling, share + TIE_BREAK *
    tanh(z / 10) unscaled, in today's units: the same affine map as the scores'."""
    return (threshold + TIE_BREAK) / (1.0 + 2 * TIE_BREAK)


def _marginal_logits(logits: dict[str, torch.Tensor], finest: str,
                     members: dict[str, torch.Tensor], temperature: float,
                     one_class: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
    """`logits` with each level in `members` replaced by the log of its classes' shares of
    the finest level's probabilities at `temperature` (`one_class`: see `branch_shares`)."""
    one_class = _one_class_levels(members) if one_class is None else one_class
    probs = torch.softmax(logits[finest].float() / temperature, -1)
    return {lv: _exact(probs @ members[lv], lv in one_class).clamp_min(1e-30).log()
            if lv in members else v for lv, v in logits.items()}


def _one_class_levels(members: dict[str, torch.Tensor]) -> frozenset[str]:
    """The levels of one class (one order), from their member matrices' widths: outside a
    traced forward, where a shape read would be frozen into the graph with a warning."""
    return frozenset(lv for lv, m in members.items() if m.shape[-1] == 1)


def _exact(share: torch.Tensor, one_class: bool) -> torch.Tensor:
    """A level's class shares of the finest probabilities; at a level of one class exactly
    1: their sum is 1 only to rounding, which a score would then rank (and the share of
    val scores it exceeds magnify), one engine's rounding apart from another's."""
    return torch.ones_like(share) if one_class else share


def branch_shares(fine_logits: torch.Tensor, levels: list[str],
                  members: dict[str, torch.Tensor], temperature: float,
                  one_class: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
    """For each level (coarse to fine), the calibrated probability of the class that
    predict names there: the top-down branch chosen on the probabilities at temperature
    1, as `Taxonomy.predict` chooses it; each class's probability the sum of its finest
    classes' at `temperature`. Tensor operations only: the exported graph computes the
    same. `members`: each coarser level's finest x level 0/1 matrix; `one_class`: the
    levels of one class (`_one_class_levels`, given where a graph is traced)."""
    one_class = _one_class_levels(members) if one_class is None else one_class
    at_1 = torch.softmax(fine_logits.float(), -1)
    shown = torch.softmax(fine_logits.float() / temperature, -1)
    under = None  # (images, finest classes): 1 under the branch chosen so far
    out = {}
    for lv in levels:
        member = members.get(lv)  # None at the finest level: its own classes
        choose = at_1 @ member if member is not None else at_1
        share = _exact(shown @ member, lv in one_class) if member is not None else shown
        if under is not None:  # only the classes under the one chosen above
            inside = (under @ member if member is not None else under) > 0
            choose = torch.where(inside, choose, torch.full_like(choose, -1.0))
        pick = choose.argmax(-1, keepdim=True)
        out[lv] = share.gather(-1, pick)[:, 0]
        picked = (torch.arange(choose.shape[-1], device=pick.device) == pick).float()
        under = picked @ member.T if member is not None else picked
    return out


class _BranchMspGraph(nn.Module):
    """MSP of a taxonomy model: 1 - the branch's class's share, which `_LevelsGraph`
    passes in place of the level's logits."""

    def forward(self, features, share):
        return 1.0 - share[:, 0]


class _LevelsGraph(nn.Module):
    """(features, {level: logits}) -> {level: score}."""

    def __init__(self, per_level: dict[str, nn.Module],
                 members: dict[str, torch.Tensor] | None = None, temperature: float = 1.0,
                 branch: bool = False):
        super().__init__()
        self.levels = list(per_level)
        self.scores = nn.ModuleList(per_level.values())  # one module shared where fitted once
        # (for a score using MSP: a taxonomy's coarser levels scored on the finest's shares)
        self.members = nn.ParameterDict({lv: nn.Parameter(m, requires_grad=False)
                                         for lv, m in (members or {}).items()})
        self.temperature, self.branch = temperature, branch
        self.one_class = _one_class_levels(members or {})

    @property
    def step(self) -> float:
        """The smallest change of a share-valued score (1 / val images): float rounding
        can move an image across one val score, and its score by this much."""
        return max((1.0 / len(v) for m in self.modules() if isinstance(m, _CombinedGraph)
                    for v in m.vals), default=0.0)

    def forward(self, features: torch.Tensor, logits: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        # A kNN score fitted once for every level is searched once per call (its module
        # keeps its result for these features until the call ends), also in a traced graph.
        if self.branch:  # each level's branch share, for _BranchMspGraph
            shares = branch_shares(logits[self.levels[-1]], self.levels,
                                   dict(self.members.items()), self.temperature,
                                   self.one_class)
            logits = {lv: share[:, None] for lv, share in shares.items()}
        elif len(self.members):
            logits = _marginal_logits(logits, self.levels[-1], dict(self.members.items()),
                                      self.temperature, self.one_class)
        try:
            return {lv: score(features, logits[lv])
                    for lv, score in zip(self.levels, self.scores, strict=True)}
        finally:
            for module in self.modules():
                if isinstance(module, _KnnGraph):
                    module.last = None


SCORES: dict[str, Callable[[], Score]] = {
    "msp": MaxSoftmax, "energy": Energy, "mahalanobis": Mahalanobis, "knn": NearestNeighbour}
COMBINED = {"msp+knn": ("msp", "knn")}


def new_known_rate(n: int, rate: float) -> float:
    """The share of new known images that one level's threshold (`level_thresholds`' cut,
    the i-th of n sorted val scores) turns away, in expectation: (n - i) / (n + 1), well
    over `rate` on a few val images (1 in 4 on 3)."""
    return (n - math.ceil((1 - rate) * (n - 1))) / (n + 1) if n else 1.0


def _between(scores: np.ndarray, cut: float) -> float:
    """Halfway from the val score `cut` to the next one above it (a millionth above `cut`
    when none is): the same val images pass, but not by a hair's breadth. At `cut` itself,
    the very val image that set it passed in PyTorch and failed in ONNX Runtime, its score
    6e-8 higher there."""
    above = scores[scores > cut]
    return (cut + float(above.min())) / 2 if above.size else cut + 1e-6 * max(abs(cut), 1.0)


def level_thresholds(val: dict[str, np.ndarray], rate: float) -> dict[str, float]:
    """Each level's threshold on the known val images' scores (`val`, per level, coarse to
    fine), so that `rate` of them fail at least one level, i.e. are not named down to the
    finest. Every level is cut at the same quantile of its own scores: the same score at
    two levels gets the same verdict. Levels thresholded at `rate` each turned away about
    twice that (12% at a 5% rate on a 4-level run, the taxonomy review)."""
    def cut(share: float) -> dict[str, float]:  # (after a val score, so that at most
        # `share` of them are above it: interpolated, 3 val images at 5% turned 1 of 3 away)
        return {lv: _between(s, float(np.quantile(s, 1.0 - share, method="higher")))
                for lv, s in val.items()}

    def turned_away(share: float) -> float:
        t = cut(share)
        return float(np.any([s > t[lv] for lv, s in val.items()], axis=0).mean())

    # What one level cut at `rate` turns away: at most `rate` (none of 11 val images at 5%).
    target = max(float((s > t).mean()) for s, t in zip(val.values(), cut(rate).values(),
                                                         strict=True))
    if turned_away(rate) <= target:  # one level, or levels that agree
        return cut(rate)
    low, high = 0.0, rate  # the largest share in between whose images stay within target
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if turned_away(middle) <= target else (low, middle)
    return cut(low)


def fit_subset(n: int, seed: int) -> torch.Tensor | None:
    """Which of `n` training images the scores are fitted on past MAX_FIT_IMAGES (sorted
    indices, drawn with `seed`), else None: all. Training draws them before it computes
    their features, so that its final pass over a large set stops at MAX_FIT_IMAGES."""
    if n <= MAX_FIT_IMAGES:
        return None
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return keep[:MAX_FIT_IMAGES].sort().values


@dataclass
class UnknownDetector:
    """Each score fitted for each level, each with its threshold; `score` is the one used
    unless another is asked for."""

    score: str
    rate: float
    levels: list[str]
    temperature: float
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)  # score -> level
    fitted: dict[str, dict[str, Score]] = field(default_factory=dict)  # score -> level
    # A taxonomy's coarser levels: which finest classes each class holds (finest x level,
    # 0/1). MSP at every level is then 1 - the calibrated probability of the class predict
    # names there, the top-down branch's (`branch`). (Bundles written before have none:
    # MSP at a coarser level is their own head's, at T 1, chosen by val loss on the very
    # images its threshold is set on, which turned away 24% of a small demo run's test
    # images where 5% was asked.)
    members: dict[str, torch.Tensor] = field(default_factory=dict)
    # False for bundles written before it: MSP at each level there is 1 - the likeliest
    # class's share, which a weak model's branch need not name (17 of 23 test images of
    # one run), so that MSP vouched for a class the answer did not give.
    branch: bool = False
    # "calibrate" once `wingspan calibrate --unknown` fitted them again: a resume that writes
    # the model again from its checkpoint (its weights damaged) says that this is lost.
    fitted_by: str = "train"
    # False for bundles written before combined shares stepped just below val scores
    # (STEPPED): they keep the rule their thresholds were set with, written again too.
    stepped: bool = True
    # The known val images the thresholds were set on (None: a bundle written before it
    # was kept): on a few, new known images are turned away well over `rate` (`expected`).
    val_images: int | None = None

    @property
    def expected(self) -> float | None:
        """The share of new known images the thresholds turn away, in expectation."""
        return None if self.val_images is None else new_known_rate(self.val_images, self.rate)

    @classmethod
    def fit(cls, features: torch.Tensor, logits: dict[str, torch.Tensor],
            labels: dict[str, torch.Tensor], val_features: torch.Tensor,
            val_logits: dict[str, torch.Tensor], score: str, rate: float,
            temperature: float = 1.0, seed: int = 0,
            members: dict[str, np.ndarray] | None = None) -> UnknownDetector:
        """Fit every score on (a subset of) the training images' features, logits and
        labels per level, and set each threshold on the known val images. `members`: a
        taxonomy's membership matrices (`Taxonomy.member`), for MSP at coarser levels."""
        check_rate(rate)
        if (keep := fit_subset(len(features), seed)) is not None:
            features = features[keep]
            logits = {lv: v[keep] for lv, v in logits.items()}
            labels = {lv: v[keep] for lv, v in labels.items()}
        levels = list(logits)
        detector = cls(score, rate, levels, temperature,
                       members={lv: torch.as_tensor(np.asarray(m), dtype=torch.float32)
                                for lv, m in (members or {}).items() if lv != levels[-1]},
                       branch=bool(members) and len(levels) > 1)
        for name, make in SCORES.items():
            shared = None if make.uses_labels else make().fit(features, None, None, temperature)
            detector.fitted[name] = {
                lv: shared or make().fit(features, logits[lv], labels[lv],
                                         temperature if lv == levels[-1] else 1.0)
                for lv in levels}
        val = detector.scores(val_features, val_logits, every=True)
        for name, parts in COMBINED.items():  # in the units of the known val images
            detector.fitted[name] = {lv: Combined(parts).fit_val({p: val[p][lv] for p in parts})
                                     for lv in levels}
        val = detector.scores(val_features, val_logits, every=True)
        detector.thresholds = {name: level_thresholds(per_level, rate)
                               for name, per_level in val.items()}
        detector.val_images = len(val_features)
        return detector

    def scores(self, features: torch.Tensor, logits: dict[str, torch.Tensor],
               score: str | None = None, every: bool = False,
               branch_logits: torch.Tensor | None = None
               ) -> dict[str, dict[str, np.ndarray]] | dict[str, np.ndarray]:
        """Per level, the score of each image (the default score, `score`, or with
        `every` a dict of them all). `branch_logits`: what a taxonomy's MSP takes in place
        of the finest logits (with TTA the log of the views' mean probabilities, on which
        the answer's branch is chosen); the other scores take `logits`."""
        names = list(self.fitted) if every else [self.check_score(score or self.score)]
        base = {n for n in names if n in SCORES}
        base |= {p for n in names if n in COMBINED for p in COMBINED[n]}
        shares = self.msp_logits(logits) if "msp" in base and not self.branch else logits
        raw = {n: {lv: self.fitted[n][lv](features, (shares if n == "msp" else logits)[lv])
                   for lv in self.levels}
               for n in SCORES if n in base and not (n == "msp" and self.branch)}
        if "msp" in base and self.branch:
            fine = logits[self.levels[-1]] if branch_logits is None else branch_logits
            raw["msp"] = {lv: 1.0 - share for lv, share in branch_shares(
                fine, self.levels, self.members, self.temperature).items()}
        for n in names:
            if n in COMBINED:
                raw[n] = {lv: self.fitted[n][lv].combine({p: raw[p][lv] for p in COMBINED[n]})
                          for lv in self.levels}
        out = {n: {lv: raw[n][lv].numpy() for lv in self.levels} for n in names}
        return out if every else out[names[0]]

    def msp_logits(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What MSP scores at each level: the level's own logits, or for a coarser level of
        a taxonomy the log of its classes' shares of the calibrated finest probabilities
        (MSP takes them at T 1: their softmax is those shares)."""
        if not self.members:
            return logits
        return _marginal_logits(logits, self.levels[-1], self.members, self.temperature)

    def graph(self, score: str | None = None) -> nn.Module:
        """The default score (or `score`) in tensor operations only, for an exported model:
        (features, {level: logits}) -> {level: score}, to compare with `thresholds`."""
        name = self.check_score(score or self.score)
        made: dict[int, nn.Module] = {}  # a score fitted once for every level, built once

        def build(n: str, lv: str) -> nn.Module:
            scorer = self.fitted[n][lv]
            if id(scorer) not in made:
                made[id(scorer)] = (scorer.graph({p: build(p, lv) for p in COMBINED[n]})
                                    if n in COMBINED else
                                    _BranchMspGraph() if n == "msp" and self.branch else
                                    scorer.graph())
            return made[id(scorer)]

        uses_msp = name == "msp" or "msp" in COMBINED.get(name, ())
        return _LevelsGraph({lv: build(name, lv) for lv in self.levels},
                            self.members if uses_msp else {}, self.temperature,
                            branch=uses_msp and self.branch)

    def check_score(self, name: str) -> str:
        if name not in self.fitted:
            raise no_such_score(name, list(self.fitted))
        return name

    def manifest(self) -> dict:
        # Its own temperature: MSP's thresholds hold for it, whatever `calibrate` does later.
        return {"score": self.score, "rate": self.rate, "levels": self.levels,
                "temperature": self.temperature,
                "thresholds": self.thresholds, "fitted_on": "train", "threshold_on": "val",
                "higher_is_unknown": True, "combined_range": [0.0, 1.0],
                **(STEPPED if self.stepped else {}),
                **({"msp": "branch"} if self.branch else {}),
                **({"fitted_by": self.fitted_by} if self.fitted_by != "train" else {}),
                **({"val_images": self.val_images} if self.val_images is not None else {})}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, per_level in self.fitted.items():
            done = set()
            for lv, scorer in per_level.items():
                if id(scorer) in done:
                    continue
                done.add(id(scorer))
                key = f"{PREFIX}{name}." + (f"{lv}." if scorer.uses_labels else "")
                out.update({key + k: v.contiguous() for k, v in scorer.tensors().items()})
        out.update({f"{PREFIX}members.{lv}": m.contiguous() for lv, m in self.members.items()})
        return out

    @classmethod
    def from_bundle(cls, entry: dict, tensors: dict[str, torch.Tensor]) -> UnknownDetector:
        levels, temperature = entry["levels"], float(entry["temperature"])
        thresholds = entry["thresholds"]
        if "combined_range" not in entry:  # written before combined scores were scaled
            thresholds = {name: ({lv: _legacy_threshold(t) for lv, t in per_level.items()}
                                 if name in COMBINED else per_level)
                          for name, per_level in thresholds.items()}
        detector = cls(entry["score"], float(entry["rate"]), levels, temperature,
                       thresholds=thresholds,
                       members={lv: m.float() for lv, m in
                                _under(tensors, f"{PREFIX}members.").items()},
                       branch=entry.get("msp") == "branch",
                       fitted_by=entry.get("fitted_by", "train"),
                       stepped=all(entry.get(k) == v for k, v in STEPPED.items()),
                       val_images=entry.get("val_images"))
        for name in entry["thresholds"]:
            if name in COMBINED:
                detector.fitted[name] = {lv: Combined(COMBINED[name], detector.stepped).load(
                    _under(tensors, f"{PREFIX}{name}.{lv}."), temperature) for lv in levels}
                continue
            make = SCORES[name]
            if make.uses_labels:
                detector.fitted[name] = {lv: make().load(
                    _under(tensors, f"{PREFIX}{name}.{lv}."),
                    temperature if lv == levels[-1] else 1.0) for lv in levels}
            else:
                shared = make().load(_under(tensors, f"{PREFIX}{name}."), temperature)
                detector.fitted[name] = dict.fromkeys(levels, shared)
        return detector


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_rate(rate: float) -> None:
    if not 0.0 < rate < 1.0:
        raise WingspanError(f"--unknown-rate must be above 0 and below 1 (got {rate}).",
                            hint="It is the share of known images the model may call "
                                 "unknown, e.g. 0.05.")


def deepest_known(levels: list[str], scores: dict[str, float],
                  thresholds: dict[str, float]) -> str | None:
    """The finest level that passes its own threshold, and every coarser one too (None:
    not even the coarsest): an unknown species can still be a confident family."""
    known = None
    for lv in levels:  # coarse to fine
        if not scores[lv] <= thresholds[lv]:  # (a NaN score, of NaN logits, is no pass)
            break
        known = lv
    return known
