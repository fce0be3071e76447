"""Seed-compatible import path: ``from src.architecture import MultiModelWithScalarHeads``."""

from salm.ensemble import MultiModelWithScalarHeads
from salm.heads import ScalarProjectionHead

__all__ = ["MultiModelWithScalarHeads", "ScalarProjectionHead"]
