"""Seed-compatible import path: ``from src.loss_functions import perfect_alignment_loss``."""

from salm.loss import perfect_alignment_loss

__all__ = ["perfect_alignment_loss"]
