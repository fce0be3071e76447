"""Make a specialist: LoRA-train a base member on a user's text or question/answer data (``salm finetune``).

The steps, one module each: :mod:`~salm.finetune.config` (the settings, checked before anything loads) ->
:mod:`~salm.finetune.data` (text windows and prompted Q/A rows) -> :mod:`~salm.finetune.model` (the frozen
base with LoRA adapters) -> :mod:`~salm.finetune.run` (optimisation, :mod:`~salm.finetune.checkpoint`\\s for
``resume``) -> :mod:`~salm.finetune.outputs` (the PEFT adapter folder and its member-set entry).
``peft`` is an optional dependency (``pip install -e ".[finetune]"``), imported only when a run starts.
"""

from salm.finetune.config import DEFAULT_TARGET_MODULES, FinetuneConfig, FinetuneError
from salm.finetune.outputs import member_entry, write_member_entry
from salm.finetune.run import FinetuneResult, finetune

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "finetune",
    "member_entry",
    "write_member_entry",
]
