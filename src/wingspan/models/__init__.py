"""Models: the backbone registry (timm), offline-first weights, heads, the bundle."""

from wingspan.models.bundle import load_bundle, save_bundle
from wingspan.models.classifier import Classifier
from wingspan.models.factory import create_classifier, create_imagenet_model
from wingspan.models.policy import resolve_policy
from wingspan.models.registry import BACKBONES, get_spec

__all__ = ["BACKBONES", "Classifier", "create_classifier", "create_imagenet_model",
           "get_spec", "load_bundle", "resolve_policy", "save_bundle"]
