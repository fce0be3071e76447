"""Each model's generations for a task: made once, stored, and read back by a rerun instead of regenerated.

An evaluation of large members runs for hours; an interrupted one resumes at the first model that had not
finished. Stored outputs are only trusted under the same key: prompts, decoding, seed, batch size, members'
fingerprints and the routing heads' weights (:func:`heads_fingerprint`), plus the model's routing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from salm.display import nested_progress, progress_message
from salm.evaluation.settings import EvalSettings, routing_for
from salm.evaluation.tasks import Task
from salm.generation import prompt_budget
from salm.io import atomic_write_jsonl

logger = logging.getLogger(__name__)

GENERATIONS_DIR = "generations"  # per task folder: each model's finished outputs, for resuming

__all__ = ["GENERATIONS_DIR", "count_cut_prompts", "generate_or_reuse", "generation_key", "heads_fingerprint"]


def count_cut_prompts(tokenizer: Any, prompts: Sequence[str], context_length: int | None, room: int) -> int:
    """How many prompts generation's ``truncate="left"`` will cut (every model gets the same cut prompt, so
    the comparison stays fair; the count is reported)."""
    if context_length is None:
        return 0
    budget = prompt_budget(context_length, room)
    return sum(len(tokenizer(p)["input_ids"]) > budget for p in prompts)


def heads_fingerprint(model: Any) -> str:
    """Hash of the routing heads' weights: stored generations are only reused with the same heads."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def generation_key(model: Any, task: Task, prompts: list[str], settings: EvalSettings) -> dict[str, Any]:
    """Everything but the routing that decides a task's generations; computed once per task."""
    from salm.features import member_fingerprint

    return {
        "task": task.name,
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "stop": settings.decoding_for(settings.decode.routing, task.stop).stops,
        "decoding": [
            settings.decode.max_new_tokens,
            settings.decode.temperature,
            settings.decode.top_p,
            settings.decode.top_k,
        ],  # fmt: skip
        "seed": settings.random_seed,
        "batch_size": settings.batch_size,
        "members": [member_fingerprint(info) for info in model.infos],
        "dtype": str(model.dtype),
        "heads": heads_fingerprint(model),
    }


def generate_or_reuse(
    model: Any,
    task: Task,
    prompts: list[str],
    name: str,
    settings: EvalSettings,
    out_dir: Path,
    key: dict[str, Any],
) -> list[Any]:
    """One model's outputs: read back when an earlier run with the same key (``key`` plus this model's
    routing) finished them, else generated and stored atomically (an interrupted run never leaves a
    partial file that a later run trusts)."""
    from salm.generation import GenerationOutput

    full_key = json.dumps({**key, "routing": routing_for(name, settings)}, sort_keys=True)
    path = out_dir / GENERATIONS_DIR / f"{name}-{hashlib.sha256(full_key.encode()).hexdigest()[:16]}.jsonl"
    if settings.resume and path.is_file():
        try:
            outputs = [GenerationOutput.from_dict(json.loads(line)) for line in path.read_text().splitlines()]
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("%s: ignoring unreadable stored generations %s (%s)", task.name, path, e)
        else:
            if len(outputs) == len(prompts):
                logger.info("%s: reusing %s's generations from %s", task.name, name, path)
                if settings.progress:
                    progress_message(f"{task.name}: reusing {name}'s finished generations ({path})")
                return outputs
    logger.info("%s: generating with %s (%d prompts)", task.name, name, len(prompts))
    outputs = model.generate(
        prompts,
        config=settings.decoding_for(routing_for(name, settings), task.stop),
        batch_size=settings.batch_size,
        return_outputs=True,
        progress=nested_progress(settings.progress),  # inside the datasets bar: only on a terminal
    )
    atomic_write_jsonl(path, (o.to_dict() for o in outputs))
    return outputs
