"""Routers: every variant one class, registered by name (see :mod:`salm.routers.base` for the interface).

Built in: ``seed`` (the seed's heads), ``confidence`` (+ the members' next-token statistics), ``joint`` (one
MLP over all members), ``aware`` (``confidence`` + each member's record on the text so far; ``salm
train``'s default) and ``evidence`` (the statistics and the record alone, no hidden states). A new variant
subclasses :class:`Router` and is decorated with :func:`register_router`; nothing else in saLM changes.
"""

from salm.routers.base import Router
from salm.routers.config import NORMS, HeadConfig
from salm.routers.layers import JointMLP, ScalarProjectionHead, heads_in_eval_mode
from salm.routers.registry import HeadConfigError, register_router, router_class, router_names, router_of_state

# The built-ins register in this order (what `salm train --help` and error messages list).
from salm.routers.seed import SeedRouter  # isort: split

from salm.routers.confidence import ConfidenceRouter  # isort: split

from salm.routers.joint import JointRouter  # isort: split

from salm.routers.aware import AwareRouter  # isort: split

from salm.routers.evidence import EvidenceRouter  # isort: split

__all__ = [
    "NORMS",
    "AwareRouter",
    "ConfidenceRouter",
    "EvidenceRouter",
    "HeadConfig",
    "HeadConfigError",
    "JointMLP",
    "JointRouter",
    "Router",
    "ScalarProjectionHead",
    "SeedRouter",
    "heads_in_eval_mode",
    "register_router",
    "router_class",
    "router_names",
    "router_of_state",
]
