"""What decides an evaluation's numbers: :class:`EvalSettings`, checked before any member loads.

The settings are written into every results file, so they live apart from the code that runs them: a
reader of ``results.json`` finds here what each key means. The names of the models a run compares (the
ensemble and each member, run as ``routing="member:<id>"``) follow from the settings, so they are here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from salm.generation import DecodeConfig, GenerationError, check_batch_size

ENSEMBLE = "ensemble"
CHOICE_MODES = ("generative", "loglik", "both")

__all__ = ["CHOICE_MODES", "ENSEMBLE", "EvalSettings", "model_names", "routing_for"]


def _default_decoding() -> DecodeConfig:
    return DecodeConfig(max_new_tokens=512, temperature=0.3)  # salm evaluate's defaults since the seed


@dataclass
class EvalSettings:
    """Everything that decides the numbers; written into every results file.

    ``decode`` is how every model decodes (its ``seed`` is ignored: ``random_seed`` seeds both the sample
    and decoding; its ``stop`` strings are added to each task's own; prompts are always cut from the left
    to fit). ``sample_size=None`` (or 0) evaluates every example. ``choice_mode`` applies to tasks with
    log-likelihood variants (MedQA). ``weights`` is only recorded (None = untrained heads).
    """

    sample_size: int | None = 50
    random_seed: int = 42
    decode: DecodeConfig = field(default_factory=_default_decoding)
    batch_size: int = 8
    only_ensemble: bool = False
    choice_mode: str = "both"
    teacher_forced: bool = True
    resume: bool = True
    save_examples: bool = False
    num_examples: int = 5
    plots: bool = True
    split: str | None = None
    weights: str | None = None
    progress: bool = True
    num_fewshot: int = 0

    def validate(self) -> None:
        problems = []
        d = self.decode
        if self.sample_size is not None and self.sample_size < 0:
            problems.append(f"sample_size must be >= 0 (0 = all), got {self.sample_size}")
        if d.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {d.max_new_tokens}")
        if d.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {d.temperature}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.choice_mode not in CHOICE_MODES:
            problems.append(f"choice mode must be one of {', '.join(CHOICE_MODES)}, got {self.choice_mode!r}")
        if self.num_examples < 0:
            problems.append(f"num_examples must be >= 0, got {self.num_examples}")
        if self.num_fewshot < 0:
            problems.append(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        try:  # it seeds decoding too: DecodeConfig's range, named as this setting
            DecodeConfig(seed=self.random_seed).validate()
        except GenerationError as e:
            problems.append(f"random_seed: {e}")
        if not problems:  # types, NaN and the routing's syntax, before any member loads
            try:
                self.decoding_for(d.routing).validate()
                check_batch_size(self.batch_size)
            except GenerationError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))

    def decoding_for(self, routing: str, stop: Sequence[str] = ()) -> DecodeConfig:
        """The decoding of one model's run: ``routing``, the task's ``stop`` strings, the run's seed."""
        return replace(
            self.decode, routing=routing, stop=[*stop, *self.decode.stops], seed=self.random_seed, truncate="left"
        )

    def to_dict(self) -> dict[str, Any]:
        """Flat, as results files have always held it (the decoding keys where they always were)."""
        d = asdict(self)
        decode = d.pop("decode")
        out: dict[str, Any] = {"sample_size": d.pop("sample_size"), "random_seed": d.pop("random_seed")}
        out.update({k: decode[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "routing")})
        num_fewshot = d.pop("num_fewshot")
        out.update(d)
        out["compile"] = decode["compile"]
        if decode["stop"]:
            out["stop"] = self.decode.stops
        out["num_fewshot"] = num_fewshot
        out["heads"] = "trained" if self.weights else "untrained (random initialisation)"
        return out


def model_names(model: Any, settings: EvalSettings) -> list[str]:
    """The models a run compares, in report order: the ensemble, then (unless ``only_ensemble``) each member."""
    names = [ENSEMBLE] + ([] if settings.only_ensemble else list(model.model_ids))
    if ENSEMBLE in model.model_ids:
        raise ValueError(f"a member may not be called {ENSEMBLE!r}: that name is the ensemble's in every report")
    return names


def routing_for(name: str, settings: EvalSettings) -> str:
    """The routing that runs model ``name``: the settings' for the ensemble, ``member:<id>`` for a member."""
    return settings.decode.routing if name == ENSEMBLE else f"member:{name}"
