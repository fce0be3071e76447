"""The command layer: one module per ``salm`` command, on top of the library.

Each module defines ``add_arguments(parser)`` (its flags) and ``run(args) -> int`` (build the library's config
objects from the flags, call the library, print, return an exit code). Nothing below imports this package: the
library takes typed configs (:class:`salm.training.TrainConfig`, :class:`salm.generation.DecodeConfig`,
:class:`salm.evaluation.runner.EvalSettings`, ...), never an ``argparse.Namespace``. Modules import torch and
the step modules inside ``run`` (or ``add_arguments`` where defaults come from a config), so ``salm --help``
imports none of them.
"""
