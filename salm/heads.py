"""Routing heads: the names saLM and the seed import them by (the routers themselves live in :mod:`salm.routers`).

Router variants (``salm train --router``, recorded as ``heads.router`` in ``salm_config.json``), each one class
in :mod:`salm.routers`:

* ``seed``: one :class:`ScalarProjectionHead` per member on its own final hidden state (the seed's heads);
* ``confidence``: the same heads, each also reading the statistics of every member's next-token
  distribution through an extra linear map added to its first layer (``stats_projection``);
* ``joint``: one MLP scoring all members at once from every member's hidden state and the statistics
  (``projection_heads.<id>`` then maps member ``id``'s hidden state into the shared trunk);
* ``aware``: the ``confidence`` heads also reading each member's record on the text so far
  (:class:`salm.confidence.History`): who predicted the prompt and the answer so far well, i.e. who *knows* it.

:class:`HeadConfig` is the one description of the heads (sizes, dropout, norm, router variant).
"""

from salm.routers import (
    NORMS,
    HeadConfig,
    HeadConfigError,
    JointMLP,
    ScalarProjectionHead,
    heads_in_eval_mode,
    router_names,
)

JointRouter = JointMLP  # the joint router's MLP, by its earlier name
ROUTERS = router_names()
"""The built-in router variants (registered when :mod:`salm.routers` is imported): seed, confidence, joint, aware."""

__all__ = [
    "NORMS",
    "ROUTERS",
    "HeadConfig",
    "HeadConfigError",
    "JointRouter",
    "ScalarProjectionHead",
    "heads_in_eval_mode",
]
