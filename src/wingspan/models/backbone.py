"""A pretrained CNN as ordered stages that can be frozen and unfrozen the same way for all.

timm names each network's stages (`group_matcher`: stem, then blocks); we turn that
into `stages`, so "freeze everything, unfreeze the last N" needs no per-architecture
index surgery.
"""

from __future__ import annotations

import math

import timm
import torch
from timm.layers import DropPath
from timm.models import group_parameters
from torch import nn

from wingspan.errors import WingspanError, first_line
from wingspan.models.registry import BackboneSpec

# timm's containers of a network's blocks, in order: each block a unit or stage of its own.
_BLOCKS = ("blocks", "stages", "dense_stages", "transformers", "layers")
# timm modules after the feature map: never part of `units`.
_HEAD_MODULES = {"global_pool", "fc", "classifier", "head", "head_drop", "fc_norm", "pre_logits"}


def _random(module: nn.Module) -> bool:
    """Dropout or stochastic depth inside: its training-mode output is not a function of
    the input alone, so it cannot run as a frozen, exported graph."""
    return any((isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
               or (isinstance(m, DropPath) and m.drop_prob > 0) for m in module.modules())


def native_size(net: nn.Module) -> int:
    """The input size a timm network was built for: its patch embedding's when it has one
    (built for another size than its pretrained config's), else the pretrained config's."""
    size = getattr(getattr(net, "patch_embed", None), "img_size", None)
    if size:
        return int(size[-1] if isinstance(size, tuple | list) else size)
    return int(net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


def _patch_size(net: nn.Module) -> int | None:
    """The side of the patches a ViT-like network cuts the image into, where it drops the
    pixels left over: a convolution whose kernel is its stride, unpadded, and no padding of
    the image to fit (timm's dynamic_img_pad). None for other networks (PVTv2's patch_size
    7 is a stride-4 padded convolution that sees every pixel)."""
    embed = getattr(net, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if not isinstance(proj, nn.Conv2d) or getattr(embed, "dynamic_img_pad", False):
        return None
    side = proj.stride[0]
    square = proj.kernel_size == proj.stride == (side, side)
    unpadded = proj.padding in ((0, 0), "valid")
    return side if square and unpadded and side > 1 else None


def stage_groups(net: nn.Module) -> list[list[str]]:
    """The network's parameter names by stage, from input to output: timm's coarse groups
    (stem, then blocks). A network timm groups not (PoolFormer and PiT have no
    group_matcher; RDNet's says "coarse grouping is not implemented") stopped every command
    that builds it with a traceback: its top-level modules in order are its stages, each
    member of a container of blocks (`_BLOCKS`) one, the parameters on the network itself
    (a class token, position embeddings) in the first, and the modules after the blocks (a
    final norm, the head's) in the last: a stage of a norm alone would train nothing else."""
    try:
        return list(group_parameters(net, net.group_matcher(coarse=True)).values())
    except (AttributeError, AssertionError, NotImplementedError):
        groups, blocks_seen = [], False
        for child, module in net.named_children():
            names = [f"{child}.{name}" for name, _ in module.named_parameters()]
            if child in _BLOCKS and isinstance(module, nn.Sequential | nn.ModuleList):
                groups += [[f"{child}.{i}.{name}" for name, _ in block.named_parameters()]
                           for i, block in module.named_children()]
                blocks_seen = True
            elif blocks_seen and groups:  # a final norm, the head: with the last blocks
                groups[-1] += names
            else:
                groups.append(names)
        groups = [group for group in groups if group] or [[]]
        groups[0][:0] = [name for name, _ in net.named_parameters(recurse=False)]
        return groups


class Backbone(nn.Module):
    """A timm network without its classifier: image batch -> its features, as timm's
    `forward_features` gives them (a CNN's map (N, C, H, W), a ViT's tokens (N, L, C), a
    Swin's NHWC map), and `pool` of those -> one vector per image (N, num_features), by
    the network's own `forward_head(pre_logits=True)`: its pooling (average, class token),
    and the norm some networks put there (ConvNeXt, MambaOut)."""

    def __init__(self, spec: BackboneSpec, train_bn: bool = False):
        super().__init__()
        self.spec = spec
        self.train_bn = train_bn
        self.net = timm.create_model(spec.timm_name, pretrained=False, num_classes=0,
                                     **spec.timm_kwargs)
        # What pre_logits gives: wider than the last map where the head has a hidden layer.
        self.num_features: int = getattr(self.net, "head_hidden_size", None) or \
            self.net.num_features
        self.built_size = self.input_size = native_size(self.net)
        groups = stage_groups(self.net)
        names = ["stem"] + [f"stage{i}" for i in range(1, len(groups))]
        # stage name -> parameter names, in order from input to output
        self.stages: dict[str, list[str]] = dict(zip(names, groups, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """`forward`'s output -> (N, num_features)."""
        return self.net.forward_head(features, pre_logits=True)

    def spatial(self, features: torch.Tensor, prefix: int | None = None) -> torch.Tensor:
        """`forward`'s output as a map (N, C, H, W), for class activation maps: a ViT's
        patch tokens (its class and register tokens dropped: `prefix` of them, else the
        network's own count) laid out on their grid, a Swin's NHWC map permuted."""
        if features.dim() == 3:
            if prefix is None:
                prefix = getattr(self.net, "num_prefix_tokens", 0)
            tokens = features[:, prefix:]
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise WingspanError(f"{self.spec.name}'s {tokens.shape[1]} tokens do not lie "
                                    "on a square grid: no activation map for it.")
            return tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)
        if getattr(self.net, "output_fmt", "NCHW") == "NHWC":
            return features.permute(0, 3, 1, 2)
        return features

    def set_input_size(self, size: int) -> None:
        """For networks built for one input size (a ViT's position embeddings, a Swin's
        windows): resize them to `size` (timm resamples the position embeddings). CNNs
        take any size and need nothing."""
        if size != self.input_size and hasattr(self.net, "set_input_size"):
            self.net.set_input_size(img_size=size)
            self.input_size = size

    @torch.no_grad()
    def check_input_size(self, size: int) -> None:
        """Refuse `size` for a network that takes its own size only (CaiT, LeViT; MaxViT
        at sizes its windows do not divide), said plainly instead of the layer's own
        assertion or shape error deep in the first pass: one pass over a blank image."""
        # A ViT cuts the image into patches, and timm drops the pixels left over: at 70 px
        # with 16 px patches, the bottom and right 6 px of every image were never seen.
        patch = _patch_size(self.net)
        if patch and size % patch and size > patch:
            below, above = size // patch * patch, (size // patch + 1) * patch
            raise WingspanError(
                f"{self.spec.name} cuts images into {patch}-pixel patches: at {size} px the "
                f"last {size - below} px of each side would never be seen.",
                hint=f"Give --image-size a multiple of {patch}: {below} or {above}.")
        was_training = self.training
        self.eval()
        try:
            self.pool(self(torch.zeros(1, 3, size, size)))
        except Exception as e:  # noqa: BLE001 - the layer's own words, whatever they are
            raise WingspanError(
                f"{self.spec.name} cannot run at {size} px: {first_line(e)}",
                hint=f"Leave out --image-size ({self.spec.name} is built for "
                     f"{self.built_size} px), try a size near it, or pick a backbone that "
                     "takes any size (a CNN, a ViT).") from e
        finally:
            self.train(was_training)

    def units(self) -> list[nn.Module] | None:
        """The network as a chain of modules (stem layers, then each block stage) whose
        composition is `forward`; None for a network that is not such a chain. Checked once
        on a small input, so an unusual timm model is simply not split."""
        if not hasattr(self, "_units"):
            chain = []
            for name, child in self.net.named_children():
                if name in _HEAD_MODULES:
                    continue
                expand = name in _BLOCKS and isinstance(child, nn.Sequential)
                chain.extend(child if expand else [child])
            self._units = chain if self._same_as_forward(chain) else None
        return self._units

    @torch.no_grad()
    def _same_as_forward(self, chain: list[nn.Module]) -> bool:
        was_training = self.training
        self.eval()
        try:
            # Its own generator: the global one drives dropout and must stay reproducible.
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            return torch.allclose(nn.Sequential(*chain)(x), self.net.forward_features(x),
                                  rtol=1e-4, atol=1e-5)
        except Exception:  # noqa: BLE001 - not a chain of these modules: don't split
            return False
        finally:
            self.train(was_training)

    def split_frozen(self) -> tuple[nn.Module, nn.Module] | None:
        """(frozen, rest): the leading units with neither a trainable parameter nor dropout,
        and the others; rest(frozen(x)) == forward(x). While fine-tuning, `frozen` is a pure
        function of the image (its BatchNorm keeps its statistics), so it can run without
        autograd, on a faster runtime. None when nothing leads frozen or the network is not
        a chain."""
        units = self.units()
        if not units:
            return None
        first = next((i for i, u in enumerate(units)
                      if any(p.requires_grad for p in u.parameters()) or _random(u)),
                     len(units))
        if first == 0 or first == len(units):
            return None
        return nn.Sequential(*units[:first]), nn.Sequential(*units[first:])

    def freeze(self) -> None:
        """No gradients anywhere; BatchNorm statistics frozen too (see `train`)."""
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def unfreeze_last(self, n: int) -> list[str]:
        """Make the last `n` stages trainable (everything else frozen); returns their names.
        Parameters that `forward` never reaches stay frozen, and a stage of nothing else
        does not count (see `unreached`)."""
        self.freeze()
        unreached = self.unreached()
        reached = [stage for stage, names in self.stages.items()
                   if any(name not in unreached for name in names)]
        chosen = reached[max(0, len(reached) - n):] if n > 0 else []  # more: all of them
        for stage in chosen:
            for name in self.stages[stage]:
                if name not in unreached:
                    self.net.get_parameter(name).requires_grad_(True)
        self.train(self.training)
        return chosen

    def unreached(self) -> set[str]:
        """Parameters of the stages that `pool(forward(x))` never uses: timm groups parts
        of its head with the last stage, and a classifier-less network may skip some
        (a ViT's unused norm). Trained, they would get no gradient, and DDP would wait for
        one forever.
        Found once, as the parameters that get no gradient from a pass on a small input,
        on the network's own device: a module's calls would miss weights used directly
        (BEiT's and EVA-02's attention takes its qkv Linear's weight: kept frozen), and a
        CPU input on a GPU model failed, which read as "none unreached" there alone."""
        if not hasattr(self, "_unreached"):
            self._unreached = self._find_unreached()
        return self._unreached

    def _find_unreached(self) -> set[str]:
        params = dict(self.net.named_parameters())
        if not params:
            return set()
        kept = {name: (p.requires_grad, p.grad) for name, p in params.items()}
        device = next(iter(params.values())).device
        was_training = self.training
        self.eval()
        size = (self.input_size, self.input_size)
        try:
            for p in params.values():
                p.requires_grad_(True)
            for shape in ((64, 64), size):  # small first; some networks fix the size
                for p in params.values():
                    p.grad = None
                try:  # (inference mode too is lifted: under it, backward failed, and
                    # a failure reads as "none unreached", which hangs DDP)
                    with torch.inference_mode(False), torch.enable_grad():
                        x = torch.zeros(1, 3, *shape, device=device)
                        self.pool(self.net.forward_features(x)).float().sum().backward()
                    break
                except Exception:  # noqa: BLE001 - a size this network refuses
                    continue
            else:
                return set()
            return {name for name, p in params.items() if p.grad is None}
        finally:
            for name, p in params.items():
                p.requires_grad_(kept[name][0])
                p.grad = kept[name][1]
            self.train(was_training)

    def train(self, mode: bool = True) -> Backbone:
        """BatchNorm layers stay in eval mode unless `train_bn` is set and they are trainable.

        Frozen ones must keep their statistics (Keras' classic fine-tuning pitfall), and even
        unfrozen ones do better on their ImageNet statistics than on those of small batches:
        switching them to batch statistics at the start of fine-tuning jolts the features
        the head was trained on. Their scale and shift still learn.
        """
        super().train(mode)
        if mode:
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    trainable = any(p.requires_grad for p in module.parameters(recurse=False))
                    module.train(self.train_bn and trainable)
        return self
