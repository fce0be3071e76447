"""What ``salm finetune`` does, as one typed object, checked before anything is read or loaded."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# Every attention and MLP projection of Qwen2/Llama-style blocks: what PEFT users target for a specialist
# (attention alone learns far less per step; the LM head and embeddings stay frozen, which adapter members need).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXT_SUFFIXES = (".txt",)
DTYPES = ("float32", "bfloat16", "float16")


class FinetuneError(ValueError):
    """A finetuning setup the user must fix (a setting, the data, the base model, a checkpoint); one line."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class FinetuneConfig:
    """Every ``salm finetune`` setting; field names are the flags' names.

    ``data`` sources are plain-text files (``.txt``: packed into ``max_length``-token windows, loss on every
    token) or question/answer data in any format ``salm train`` reads (files, known names, hub ids: shown with
    saLM's prompt template, loss on the answer unless ``loss_on="all"``).
    """

    base: str = ""  # local folder or hub id of the model the adapter is trained on
    data: list[str] = field(default_factory=list)
    output_dir: str = "./specialist"
    eval_data: list[str] = field(default_factory=list)  # held-out loss before and after training
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    learning_rate: float = 2e-4
    num_epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides num_epochs
    batch_size: int = 4  # examples (or text windows) per forward
    grad_accum: int = 1  # forwards per optimizer step
    warmup_steps: int = 0
    max_length: int = 256
    max_examples: int | None = None  # first N rows of each question/answer source (quick runs)
    loss_on: str = "answer"  # question/answer data: the answer tokens, or "all" of the text
    seed: int = 42
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: far less memory, slower
    device: str | None = None
    save_every: int = 10  # checkpoint every N optimizer steps
    resume: bool = False
    trust_remote_code: bool = False
    revision: str | None = None  # of a hub base
    member_id: str | None = None  # the adapter member's id (default: the output folder's name)
    members_out: str | None = None  # a member-set file to add the adapter member to (created if missing)
    progress: bool = True

    @property
    def out(self) -> Path:
        return Path(self.output_dir).expanduser()

    def settings(self) -> dict[str, Any]:
        """The settings reports and checkpoints record (``progress`` left out)."""
        d = asdict(self)
        d.pop("progress")
        return d

    @staticmethod
    def resume_keys() -> tuple[str, ...]:
        """Settings a resumed run must share with its checkpoint: all that changes the adapter's trajectory."""
        # The data count by content (the checkpoint records its hash), not by where the files are.
        # Checkpointed activations give the same gradients, so a run may resume with them on after running out
        # of memory.
        off = {"data", "eval_data", "output_dir", "device", "gradient_checkpointing", "save_every", "resume",
               "member_id", "members_out", "progress"}  # fmt: skip
        return tuple(f.name for f in fields(FinetuneConfig) if f.name not in off)

    def problems(self) -> list[str]:
        """What is wrong with the settings, each a line naming its flag (empty: nothing)."""
        for name in ("lora_r", "num_epochs", "batch_size", "grad_accum", "warmup_steps", "max_length", "seed",
                     "save_every"):  # fmt: skip
            if not _is_int(getattr(self, name)):
                return [f"--{name} must be an integer, got {getattr(self, name)!r}"]
        for name in ("lora_alpha", "lora_dropout", "learning_rate"):
            if not _is_number(getattr(self, name)):
                return [f"--{name} must be a finite number, got {getattr(self, name)!r}"]
        for name in ("data", "eval_data", "target_modules"):  # a lone string would be read letter by letter
            value = getattr(self, name)
            if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
                return [f"--{name} must be a list of names, got {value!r}"]
        checks = [
            (bool(self.base), "--base is required: a local model folder or a hub id"),
            (bool(self.data), "--data needs at least one file, dataset name or hub id"),
            (self.lora_r >= 1, f"--lora_r must be >= 1, got {self.lora_r}"),
            (self.lora_alpha > 0, f"--lora_alpha must be > 0, got {self.lora_alpha}"),
            (0.0 <= self.lora_dropout < 1.0, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (bool(self.target_modules), "--target_modules needs at least one module name"),
            (self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}"),
            (self.num_epochs >= 1, f"--num_epochs must be >= 1, got {self.num_epochs}"),
            (self.max_steps is None or (_is_int(self.max_steps) and self.max_steps >= 1),
             f"--max_steps must be an integer >= 1, got {self.max_steps!r}"),
            (self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad_accum must be >= 1, got {self.grad_accum}"),
            (self.warmup_steps >= 0, f"--warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.max_length >= 2, f"--max_length must be >= 2, got {self.max_length}"),
            (self.max_examples is None or (_is_int(self.max_examples) and self.max_examples >= 1),
             f"--max_examples must be an integer >= 1, got {self.max_examples!r}"),
            (self.loss_on in ("answer", "all"), f"--loss_on must be answer or all, got {self.loss_on!r}"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
            (self.save_every >= 1, f"--save_every must be >= 1, got {self.save_every}"),
            (self.member_id is None or (bool(self.member_id) and "." not in self.member_id),
             f"--member_id must be non-empty and contain no '.', got {self.member_id!r}"),
        ]  # fmt: skip
        return [msg for ok, msg in checks if not ok]

    def validate(self) -> None:
        """Every setting, the data sources and the output folder, checked before any reading or loading."""
        problems = self.problems()
        if problems:
            raise FinetuneError(problems[0])
        for flag, sources in (("--data", self.data), ("--eval_data", self.eval_data)):
            for source in sources:
                check_source(source, flag)
        if self.out.exists() and not self.out.is_dir():
            raise FinetuneError(f"--output_dir {self.output_dir} is a file, not a folder")
        if self.members_out is not None:
            read_member_entries(Path(self.members_out).expanduser())  # an unreadable file fails now, not at the end
        base = Path(self.base).expanduser()
        if (base.exists() or self.base.startswith((".", "/", "~"))) and not (base / "config.json").is_file():
            raise FinetuneError(f"--base {self.base} is not a model folder (config.json, weights, tokenizer)")
        from salm.members import resolve_device

        resolve_device(self.device)  # a MemberError naming the devices this machine has

    def adapter_member_id(self) -> str:
        """The id of the adapter member: ``member_id``, else the output folder's name ('.' is not allowed)."""
        return self.member_id or self.out.resolve().name.replace(".", "-") or "specialist"


def is_text_source(source: str) -> bool:
    return Path(source).suffix.lower() in TEXT_SUFFIXES


def check_source(source: str, flag: str) -> None:
    """A data source that cannot be read is an error naming the flag, before any loading.

    Plain-text files must exist; anything else goes through the question/answer resolver (which reads
    nothing), so a missing ``.jsonl`` or an unknown name fails here as it would in ``salm train``.
    """
    from salm.data.loading import LOCAL_SUFFIXES, resolve_dataset

    path = Path(source).expanduser()
    if is_text_source(source):
        if not path.is_file():
            raise FinetuneError(f"{flag}: text file not found: {source}")
        return
    if path.is_file() and path.suffix.lower() not in LOCAL_SUFFIXES:
        kinds = ", ".join((*TEXT_SUFFIXES, *LOCAL_SUFFIXES))
        raise FinetuneError(f"{flag}: {source}: unsupported file type {path.suffix!r}; use one of {kinds}")
    try:
        resolve_dataset(source, None if path.is_file() else "train")
    except (FileNotFoundError, IsADirectoryError) as e:
        raise FinetuneError(f"{flag}: {e}") from None


def read_member_entries(path: Path) -> list[Any] | None:
    """The member list of the member-set file ``path`` (None if there is none yet); unreadable is an error."""
    if not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001 - OS, decoding and parser errors all mean "unreadable"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FinetuneError(f"--members_out {path} could not be read: {first}") from None
    members = raw.get("members") if isinstance(raw, dict) else raw
    if not isinstance(members, list):
        raise FinetuneError(f"--members_out {path}: expected a list of members or a 'members:' list")
    return members
