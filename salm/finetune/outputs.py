"""What a finetune leaves: the PEFT adapter folder, and the adapter as an entry of a member-set file.

The adapter-member schema lives in :func:`member_entry` alone, so a change of the schema is one edit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from salm.finetune.config import read_member_entries

ADAPTER_DIR = "adapter"
REPORT = "finetune_report.json"


def save_adapter(model: Any, folder: Path) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (what ``PeftModel.from_pretrained`` reads),
    written as one folder: a crash leaves the previous adapter or none, never half of one."""
    from salm.io import atomic_dir

    with atomic_dir(folder) as tmp:  # which also gives the files ordinary modes (safetensors writes 0600)
        model.save_pretrained(str(tmp))
    return folder


def _where(path: str) -> str:
    """A local folder as an absolute path (member-set files resolve relative paths against their own folder);
    a hub id as it is."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def member_entry(member_id: str, base: str, adapter: str | Path) -> dict[str, str]:
    """The member-set entry of an adapter member: the base model plus the adapter folder on it."""
    return {"id": member_id, "path": _where(base), "adapter": _where(str(adapter))}


def write_member_entry(path: str | Path, entry: dict[str, Any], base_id: str = "base") -> Path:
    """Add ``entry`` to the member-set file ``path`` (replacing a member of the same id), atomically.

    A new file gets the base model itself as a second member (``base_id``), so it is at once an ensemble of
    the general model and its specialist. JSON, or YAML for ``.yaml``/``.yml``, as ``salm.members`` reads them.
    """
    from salm.io import atomic_write_text

    path = Path(path).expanduser()
    members = read_member_entries(path)
    if members is not None:
        members = [m for m in members if not (isinstance(m, dict) and m.get("id") == entry["id"])] + [entry]
    else:
        if base_id == entry["id"]:
            base_id = f"{base_id}-base"
        members = [{"id": base_id, "path": entry["path"]}, entry]
    document = {"members": members}
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return atomic_write_text(path, yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return atomic_write_text(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
