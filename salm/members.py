"""Members: which frozen causal LMs form the ensemble, how they load, and whether they can be mixed.

Token-level routing only makes sense when every member reads and writes the same token ids, so the
tokenizer check here is strict (identical token->id maps) while cosmetic differences (eos/pad
settings, chat templates) of community finetunes are only warned about.

Member sets live in one place each way: :func:`load_member_set` reads a YAML/JSON file,
:func:`write_member_set` writes one (every builder uses it). Member ids and their aliases are resolved
only by :func:`resolve_member_id`, over the members actually loaded.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """One member: the seed's fields, plus where it lives, on which device it runs and, for a finetune held as a
    PEFT adapter, the adapter applied to the model at ``path`` (members on one base share its weights:
    :mod:`salm.adapters`)."""

    id: str
    name: str
    path: str
    parameters: str = ""
    task: str = ""
    revision: str | None = None
    device: str | None = None
    adapter: str | None = None  # a PEFT LoRA adapter of the model at ``path`` (local folder or hub id)
    adapter_revision: str | None = None
    aliases: tuple[str, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("aliases")
        return {k: v for k, v in d.items() if v not in (None, "")}


MODELS: list[ModelInfo] = [
    ModelInfo("qwen-25-15b", "Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B", "1.5B", "general"),
    ModelInfo(
        "qwen-25-15b-med",
        "Qwen2.5-1.5B medical finetune",
        "Arthur-77/QWEN2.5-1.5B-medical-finetuned",
        "1.5B",
        "medical",
        aliases=("quen-25-15b-med",),  # the seed's misspelled id
    ),
    ModelInfo("qwen-25-15b-math", "Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Math-1.5B", "1.5B", "math"),
]


class MemberError(ValueError):
    """A member set, member path or member compatibility problem the user must fix."""


def resolve_member_id(name: str, members: Sequence[ModelInfo | str]) -> str | None:
    """The id of the member in ``members`` that ``name`` names (its id or one of its aliases, e.g. the seed's
    ``quen-25-15b-med``), or None. The one alias resolver: member selection, head weights saved under an
    alias and ``member:<id>`` routing all ask it, with the members actually loaded (a plain id string
    stands for a member without aliases), so an alias means what the loaded member set says it means.
    """
    for m in members:
        if isinstance(m, str):
            if name == m:
                return m
        elif name == m.id or name in m.aliases:
            return m.id
    return None


def canonical_id(model_id: str, models: Sequence[ModelInfo] = MODELS) -> str:
    """Map an id or alias (e.g. the seed's ``quen-25-15b-med``) to the canonical member id."""
    mid = resolve_member_id(model_id, models)
    if mid is None:
        known = ", ".join(m.id for m in models)
        raise MemberError(f"unknown member id {model_id!r}; known members: {known}")
    return mid


def select_models(ids: Iterable[str], models: Sequence[ModelInfo] = MODELS) -> list[ModelInfo]:
    """Pick members by id or alias, keeping the requested order."""
    by_id = {m.id: m for m in models}
    return [by_id[canonical_id(i, models)] for i in ids]


def load_member_set(path: str | os.PathLike) -> list[ModelInfo]:
    """Read a member set from YAML or JSON: a list of members, or ``{"members": [...]}``.

    Relative local paths are resolved against the file's folder, so a member-set file can travel with
    the model folders it names.
    """
    path = Path(path)
    if not path.is_file():
        raise MemberError(f"member-set file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001 - parser errors differ by format; report them uniformly
        raise MemberError(f"member-set file {path} could not be parsed: {e}") from e
    entries = raw.get("members") if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise MemberError(f"member-set file {path}: expected a list of members or a 'members:' list")
    members = [member_from_entry(entry, i, f"member-set file {path}", path.parent) for i, entry in enumerate(entries)]
    validate_member_set(members, source=str(path))
    return members


MEMBER_FIELDS = {f for f in ModelInfo.__dataclass_fields__ if f != "aliases"}
"""The fields a member-set entry (and a saved ``salm_config.json`` member) may have."""


def member_from_entry(entry: Any, i: int, source: str, base: Path | None = None) -> ModelInfo:
    """One member from its entry in a member-set file (``{"id": ..., "path": ..., ...}``), checked.

    ``base`` is the file's folder: a relative local path (of the model or its adapter) is resolved against it,
    so a member-set file can travel with the folders it names. Without it (a list given in Python) paths stay
    as given.
    """
    if not isinstance(entry, dict) or "id" not in entry or "path" not in entry:
        raise MemberError(f"{source}: member #{i + 1} needs at least 'id' and 'path'")
    unknown = set(entry) - MEMBER_FIELDS
    if unknown:
        raise MemberError(f"{source}: member {entry['id']!r} has unknown fields {sorted(unknown)}")

    def local(p: str) -> str:
        if base is None:
            return p
        resolved = (base / p).expanduser()
        if not Path(p).is_absolute() and (p.startswith(".") or resolved.exists()):
            return str(resolved.resolve())
        return p

    return ModelInfo(
        id=str(entry["id"]),
        name=str(entry.get("name", entry["id"])),
        path=local(str(entry["path"])),
        parameters=str(entry.get("parameters", "")),
        task=str(entry.get("task", "")),
        revision=entry.get("revision"),
        device=entry.get("device"),
        adapter=local(str(entry["adapter"])) if entry.get("adapter") is not None else None,
        adapter_revision=entry.get("adapter_revision"),
    )


def write_member_set(path: str | os.PathLike, members: Sequence[ModelInfo], comment: str | None = None) -> Path:
    """Write a member-set file that :func:`load_member_set` reads back as ``members`` (the only writer).

    YAML for ``.yaml``/``.yml`` (with ``comment`` as a header; safe_dump quotes what needs it), JSON otherwise.
    Paths are written as given: a relative path is read back relative to the file's folder, so a folder of
    members plus this file can move together. Written atomically; aliases are code-only and not written.
    """
    from salm.io import atomic_write_text

    validate_member_set(members, source=str(path))
    entries = [m.to_dict() for m in members]
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml

        class Dumper(yaml.SafeDumper):  # list items indented under their key, as people write YAML
            def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
                super().increase_indent(flow, False)

        header = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
        text = header + yaml.dump({"members": entries}, Dumper=Dumper, sort_keys=False, allow_unicode=True)
    else:
        text = json.dumps({"members": entries}, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def validate_member_set(models: Sequence[ModelInfo], source: str = "member set") -> None:
    if len(models) < 2:
        raise MemberError(f"{source}: an ensemble needs at least 2 members, got {len(models)}")
    ids = [m.id for m in models]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise MemberError(f"{source}: duplicate member ids {dupes}")
    for m in models:
        if "." in m.id or not m.id:
            raise MemberError(f"{source}: member id {m.id!r} must be non-empty and contain no '.'")


def resolve_models(
    models: str | os.PathLike | Sequence[ModelInfo | dict[str, Any]] | None,
) -> list[ModelInfo]:
    """Accept ``None`` (the default trio), a member-set file, or a list of ModelInfo or of member-set file
    entries (dicts with ``id`` and ``path``, checked as the file's are)."""
    if models is None:
        return list(MODELS)
    if isinstance(models, (str, os.PathLike)):
        return load_member_set(models)
    if isinstance(models, dict) or not isinstance(models, Iterable):
        raise MemberError(
            f"members must be a member-set file or a list of ModelInfo or {{'id', 'path'}} dicts, "
            f"got {type(models).__name__}"
        )
    infos = []
    for i, m in enumerate(models):
        if isinstance(m, ModelInfo):
            infos.append(m)
        elif isinstance(m, dict):
            infos.append(member_from_entry(m, i, "member list"))
        else:
            raise MemberError(
                f"member list: member #{i + 1} is a {type(m).__name__}; expected a ModelInfo or a dict "
                "with at least 'id' and 'path'"
            )
    validate_member_set(infos)
    return infos


def available_devices() -> list[str]:
    """The devices torch can use on this machine, for error messages."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def resolve_device(device: str | torch.device | None, what: str = "--device") -> torch.device:
    """A usable torch device, or a :class:`MemberError` naming the devices this machine has.

    Checked before any member loads: torch's own errors for a GPU that is absent (``Torch not compiled with
    CUDA enabled``) or a misspelt name arrive as tracebacks from deep inside model loading.
    """
    if device is None:
        return torch.device(default_device())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MemberError(
            f"{what} {device!r} is not a device; devices on this machine: {', '.join(available_devices())}"
        ) from None
    ok = True
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
    elif dev.type == "mps":
        ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    elif dev.type not in ("cpu", "meta"):
        ok = False
    if not ok:
        raise MemberError(
            f"{what} {device!r} is not available on this machine; devices here: {', '.join(available_devices())}"
        )
    return dev


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """A torch dtype from a dtype, its name (``"bfloat16"``, as Hugging Face accepts), or ``"auto"``/None: the
    default for ``device`` (:func:`default_dtype`; on the CPU the choice is printed once)."""
    if dtype is None or dtype == "auto":
        chosen = default_dtype(device)
        if torch.device(device).type == "cpu":
            from salm.cpu import announce

            announce(chosen)
        return chosen
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise MemberError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return resolved
    return dtype


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on accelerators (the members are frozen, so half precision costs no training accuracy); on the CPU
    bf16 where it multiplies bf16 natively, else fp32 (:func:`salm.cpu.auto_dtype`, which says why)."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    from salm.cpu import auto_dtype

    return auto_dtype()


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~"))


# ------------------------------------------------------------------------------------------ the hub, offline
HUB_PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "yes", "true"}
_hub_probe: dict[str, str | None] = {}  # endpoint -> None (reachable) or why not; one probe per process


def hub_offline() -> bool:
    """Whether Hugging Face libraries are in offline mode (``HF_HUB_OFFLINE=1``, or set by :func:`prepare_hub`)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(constants is not None and constants.HF_HUB_OFFLINE)


def _go_offline() -> None:
    """Offline mode for this process, also in the Hugging Face libraries already imported (they read the
    variable once, at import): only what is in the local cache loads, and no request is ever retried."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, attrs in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        mod = sys.modules.get(module)
        for attr in attrs if mod is not None else ():
            if hasattr(mod, attr):
                setattr(mod, attr, True)


def prepare_hub() -> bool:
    """Call before the first hub access; True when working offline.

    Unreachable hubs cost a minute per command otherwise: every file request is retried five times with
    backoff, each retry logged. So one short probe (``HUB_PROBE_TIMEOUT_S``) decides, once per process:
    if the hub cannot be reached, offline mode is switched on (cached models and datasets still load), and
    one warning says so. ``HF_HUB_OFFLINE=1`` skips the probe.
    """
    if hub_offline():
        return True
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if endpoint not in _hub_probe:
        _hub_probe[endpoint] = _probe(endpoint)
        if _hub_probe[endpoint] is not None:
            logger.warning(
                "the Hugging Face hub (%s) cannot be reached (%s): working offline, from the local cache only "
                "(set HF_HUB_OFFLINE=1 to skip this check)",
                endpoint,
                _hub_probe[endpoint],
            )
    if _hub_probe[endpoint] is None:
        return False
    _go_offline()
    return True


def _probe(endpoint: str) -> str | None:
    """None if ``endpoint`` answers (any HTTP status) within the timeout, else why not."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S, follow_redirects=False)
    except Exception as e:  # noqa: BLE001 - connection, DNS, TLS, proxy and timeout errors all mean "unreachable"
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None


def offline_advice(info: ModelInfo) -> str:
    """What to do when a hub member is not in the local cache and the hub cannot be reached."""
    return (
        f"member {info.id!r}: {info.path} is not in the local Hugging Face cache and the hub is offline or "
        "unreachable. Use members in local folders: --models FILE, a member-set file whose paths are folders "
        "(the quickstart's members file works: `salm quickstart` prints its path), or download the members once "
        f"where the hub is reachable (`hf download {info.path} --local-dir DIR`, then point the file's path at DIR). "
        "HF_HUB_OFFLINE=1 makes every command use the local cache without trying the hub."
    )


def _local_or_hub(info: ModelInfo, where: str, what: str) -> str:
    """A local folder (which must exist; ``what`` names it in the error) or a hub id, after the hub check
    (:func:`prepare_hub`)."""
    if _is_local(where):
        path = str(Path(where).expanduser())
        if not Path(path).is_dir():
            raise MemberError(f"member {info.id!r}: {what} {where} is not a readable folder")
        return path
    prepare_hub()
    return where


def _resolve_path(info: ModelInfo) -> str:
    """The folder or hub id to load ``info`` from."""
    return _local_or_hub(info, info.path, "local path")


def resolve_adapter_path(info: ModelInfo) -> str:
    """The folder or hub id to load ``info``'s adapter from."""
    if info.adapter is None:
        raise MemberError(f"member {info.id!r} has no adapter")
    return _local_or_hub(info, info.adapter, "adapter")


def _load_error(info: ModelInfo, what: str, e: Exception) -> MemberError:
    if not _is_local(info.path) and hub_offline() and isinstance(e, OSError):
        return MemberError(offline_advice(info))
    return MemberError(f"member {info.id!r}: could not load the {what} from {info.path}: {e}")


def load_tokenizer(info: ModelInfo, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = _resolve_path(info)
    try:
        return AutoTokenizer.from_pretrained(path, revision=info.revision, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise _load_error(info, "tokenizer", e) from e


def load_member_model(
    info: ModelInfo,
    device: str | torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    pack: bool = True,
):
    """Load one member frozen and in eval mode: no gradients ever flow into a member. On the CPU the linear
    layers of a large enough member are packed for oneDNN (:func:`salm.cpu.should_pack`, ``SALM_CPU_PACK``)
    unless ``pack`` is False (a base that PEFT adapters are injected into first, or one being finetuned)."""
    from transformers import AutoModelForCausalLM

    path = _resolve_path(info)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=info.revision, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # noqa: BLE001
        raise _load_error(info, "model", e) from e
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    if pack:  # oneDNN's blocked weights: a decode step reads each once, whatever the batch
        from salm.cpu import pack_if_worthwhile

        pack_if_worthwhile(model, device)
    return model


def check_tokenizers(tokenizers: Sequence[Any], models: Sequence[ModelInfo]) -> None:
    """Raise unless every member maps every token to the same id; warn on special-token differences."""
    ref, ref_info = tokenizers[0], models[0]
    ref_vocab = ref.get_vocab()
    for tok, info in zip(tokenizers[1:], models[1:]):
        vocab = tok.get_vocab()
        if vocab != ref_vocab:
            first = _first_difference(ref_vocab, vocab)
            raise MemberError(
                f"tokenizer mismatch between members {ref_info.id!r} and {info.id!r}: {first}; "
                "token-level routing needs identical token->id maps"
            )
        for attr in ("eos_token", "pad_token", "bos_token"):
            a, b = getattr(ref, attr, None), getattr(tok, attr, None)
            if a != b:
                warnings.warn(
                    f"members {ref_info.id!r} and {info.id!r} differ in {attr} ({a!r} vs {b!r}); "
                    "generation stops at any member's EOS id",
                    stacklevel=2,
                )


def _first_difference(a: dict[str, int], b: dict[str, int]) -> str:
    for token in sorted(set(a) | set(b), key=lambda t: (a.get(t, b.get(t, 0)), t)):
        if a.get(token) != b.get(token):
            return f"token {token!r} has id {a.get(token)} vs {b.get(token)}"
    return "vocabularies differ"


def eos_token_ids(models: Sequence[Any], tokenizer: Any) -> set[int]:
    """Every EOS id any member (config, generation config or tokenizer) declares: generation stops at any."""
    ids: set[int] = set()

    def add(v: Any) -> None:
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v if x is not None)

    for m in models:
        add(getattr(m.config, "eos_token_id", None))
        gc = getattr(m, "generation_config", None)
        if gc is not None:
            add(getattr(gc, "eos_token_id", None))
    add(tokenizer.eos_token_id)
    return ids


def context_length(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
