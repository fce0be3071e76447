"""Seed-compatible import path: ``from src.models import MODELS``."""

from salm.members import MODELS, ModelInfo

__all__ = ["MODELS", "ModelInfo"]
