"""HeadConfig: the one description of the routing heads, saved beside their weights (PEFT's ``LoraConfig`` manner).

The ensemble is built from it, ``save_pretrained`` writes it as ``"heads"`` in ``salm_config.json`` and
``from_pretrained`` reads it back. A new head option is one field here (checked in ``__post_init__``), read
where the router builds its modules; what a field means for one router only, that router checks
(:meth:`salm.routers.base.Router.check_config`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from salm.routers.registry import HeadConfigError, router_class

NORMS = ("layer", "batch")
"""Head normalisation: ``layer`` for every new head; ``batch`` only to run the seed's BatchNorm heads."""


@dataclass(frozen=True)
class HeadConfig:
    """What the routing heads are: saved beside their weights, so a folder rebuilds exactly its heads.

    Frozen: change a field with :func:`dataclasses.replace`, which checks the new value like the constructor.
    The defaults here are the only head defaults in saLM (the ensemble, ``from_pretrained`` and training
    take them from this class). ``router`` defaults to ``seed``, what an untrained ensemble and the seed's
    heads are; ``salm train`` picks its own router (its ``--router`` default).
    """

    hidden_dim: int = 256  # width of the first layer (the second has hidden_dim // 2 units)
    dropout: float = 0.1  # between the layers, only while training
    norm: str = "layer"  # one of NORMS
    router: str = "seed"  # a registered router (salm.routers.router_names())

    def __post_init__(self) -> None:
        h, p = self.hidden_dim, self.dropout
        if not isinstance(h, int) or isinstance(h, bool) or h < 2:  # 2 // 2 = 1 unit is the least that reads
            raise HeadConfigError(f"HeadConfig.hidden_dim must be an integer >= 2, got {h!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p) or not 0 <= p < 1:
            raise HeadConfigError(f"HeadConfig.dropout must be a number in [0, 1), got {p!r}")
        if self.norm not in NORMS:
            raise HeadConfigError(f"HeadConfig.norm must be one of {', '.join(NORMS)}; got {self.norm!r}")
        problem = router_class(self.router).check_config(self)
        if problem:
            raise HeadConfigError(problem)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (what ``salm_config.json`` holds under ``"heads"``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HeadConfig:
        """The inverse of :meth:`to_dict`; missing fields take the defaults, unknown ones are an error."""
        if not isinstance(values, Mapping):
            raise HeadConfigError(f"HeadConfig needs a JSON object of fields, got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise HeadConfigError(f"unknown HeadConfig field(s) {unknown} (known: {', '.join(known)})")
        return cls(**values)
