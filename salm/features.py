"""Training examples as token ids, and the frozen members' features at every loss position, cached on disk.

Only the heads train, so what the members compute never changes between epochs: per loss position we
keep each member's final hidden state (what its head reads) and its log-prob of the gold next token
(what the loss mixes). Extracting these once and training every epoch on them costs about one frozen
forward pass instead of one per epoch.

Layout of one cached split, ``<cache_dir>/<split>-<key[:16]>/``:

* ``hidden_<i>.bin``: member ``i``'s hidden states ``[P, H_i]`` at the members' own precision (fp32 for
  fp32 members; 2 bytes for fp16, and for bf16 members their raw bits), so the cache is lossless and
  cached training equals ``--no_feature_cache`` up to summation order;
* ``gold.bin``: ``[P, M]`` fp32 log p_m(gold token);
* ``stats.bin``: ``[P, F]`` fp32 router statistics (:func:`salm.confidence.stored_dim`, ``F = M*M + 5*M + 1``:
  25 floats for three members): each member's record on the text so far (:class:`salm.confidence.History`,
  ``2*M``, what the ``aware`` router adds), then the confidence statistics of every member's next-token
  distribution (:func:`salm.confidence.confidence_stats`, ``M*M + 3*M + 1``), what the ``confidence``/``joint``
  routers read and the disagreement-weighted loss weighs by;
* ``offsets.bin``: ``[N + 1]`` int64, example ``n`` owns positions ``offsets[n]:offsets[n+1]``;
* ``manifest.json``, written last: the key, the key's ingredients and the shapes.

The key hashes everything the features depend on (members and their files, dtype, vocabulary, the token
ids and labels, max_length, loss_on, :data:`FORMAT_VERSION`), so a changed input never reuses a stale
cache. A split is built in a temporary folder that is renamed into place only once complete, so a crash
never leaves a folder a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salm.confidence import stored_dim
from salm.io import atomic_write_json, human_bytes, owner_tag

FORMAT_VERSION = 3  # 2: stats.bin; 3: stats.bin rows start with the members' history
MANIFEST = "manifest.json"
# Extraction batches hold at most this many (padded) tokens; examples are length-sorted to cut padding.
# CPUs run fastest on cache-sized batches (measured: 2048 tokens ~1.6x faster than 16384); accelerators on big ones.
EXTRACT_BATCH_TOKENS = {"cpu": 2048, "default": 16384}
EXTRACT_MAX_BATCH = 64

_STORAGE = {  # member dtype -> (numpy dtype on disk, torch dtype to view the loaded bits as)
    torch.float32: (np.float32, torch.float32),
    torch.float16: (np.float16, torch.float16),
    torch.bfloat16: (np.int16, torch.bfloat16),  # numpy has no bf16: keep the raw bits
}


class FeatureCacheError(RuntimeError):
    """The feature cache cannot be written (e.g. the disk is too small); the message names the folder."""


class TokenizationError(ValueError):
    """A split has no usable example after tokenization (e.g. every prompt is longer than max_length)."""


# ---------------------------------------------------------------------------------------------- tokenization
@dataclass
class TokenizedSplit:
    """One split's examples as token ids with HF-style labels (aligned with ids, -100 = no loss)."""

    name: str
    input_ids: list[list[int]]
    labels: list[list[int]]
    datasets: list[str]
    example_ids: list[str]
    # dataset -> examples whose prompt lost its start / whose answer lost its end to fit max_length
    prompts_truncated: dict[str, int] = field(default_factory=dict)
    answers_truncated: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @cached_property
    def n_positions(self) -> list[int]:
        """Loss positions per example: positions t whose next token t+1 carries a label."""
        return [sum(1 for x in lab[1:] if x != -100) for lab in self.labels]

    def content_hash(self) -> str:
        """sha256 of the token ids and labels themselves: any change in data or tokenization changes it."""
        h = hashlib.sha256()
        for ids, lab in zip(self.input_ids, self.labels):
            h.update(np.asarray([len(ids)], dtype=np.int64).tobytes())
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(np.asarray(lab, dtype=np.int64).tobytes())
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.datasets).items()))


def tokenize_examples(
    examples: Sequence[Any], tokenizer: Any, max_length: int, loss_on: str, name: str
) -> TokenizedSplit:
    """``tokenizer(prompt) + tokenizer(answer) + [eos]``, fitted into ``max_length``.

    Prompt and answer are tokenized apart and concatenated so the prompt/answer boundary is exact (the
    prompt is tokenized the way generation tokenizes it). ``loss_on="answer"`` labels the answer tokens
    and EOS only (what generation routes); ``"all"`` labels every token (the seed's behaviour).

    Too long an example loses the *start of its prompt* (a BOS token is kept), as generation and
    evaluation truncate prompts, so the answer the heads learn to route is kept whole; only an answer
    that alone exceeds ``max_length - 1`` tokens loses its end. Both are counted per dataset (the seed cut
    from the right, which dropped the final answer of long MedQA questions).
    """
    if loss_on not in ("answer", "all"):
        raise ValueError(f"loss_on must be 'answer' or 'all', got {loss_on!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TokenizationError("the members' tokenizer has no EOS token; training targets end with EOS")
    examples = list(examples)
    if not examples:
        raise TokenizationError(f"the {name} split has no usable example: it is empty")
    prompts = tokenizer([ex.prompt for ex in examples])["input_ids"]
    answers = tokenizer([ex.answer for ex in examples], add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    out = TokenizedSplit(name, [], [], [], [])
    for ex, p, a in zip(examples, prompts, answers):
        p, a = list(p), list(a) + [eos]
        if len(a) > max_length - 1:
            a = a[: max_length - 1]
            out.answers_truncated[ex.dataset] = out.answers_truncated.get(ex.dataset, 0) + 1
        room = max_length - len(a)
        if len(p) > room:
            keep_bos = bos is not None and p[0] == bos and room > 1
            p = ([bos] if keep_bos else []) + p[len(p) - (room - keep_bos) :]
            out.prompts_truncated[ex.dataset] = out.prompts_truncated.get(ex.dataset, 0) + 1
        ids = p + a
        labels = list(ids) if loss_on == "all" else [-100] * len(p) + a
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.datasets.append(ex.dataset)
        out.example_ids.append(ex.id)
    return out


def collate(split: TokenizedSplit, indices: Sequence[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ``(input_ids, attention_mask, labels)`` for the examples at ``indices``."""
    width = max(len(split.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), -100, dtype=torch.long)
    for r, i in enumerate(indices):
        n = len(split.input_ids[i])
        ids[r, :n] = torch.tensor(split.input_ids[i])
        mask[r, :n] = 1
        labels[r, :n] = torch.tensor(split.labels[i])
    return ids, mask, labels


# ---------------------------------------------------------------------------------------------- members
def compute_features(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Each member's final hidden state ``[P, H_m]``, gold log-prob ``[P, M]`` and confidence statistics
    ``[P, F]`` at the batch's loss positions.

    Positions come example-major, then in text order (the order of ``mask.nonzero()``), as in
    :meth:`MultiModelWithScalarHeads.member_features`, which computes them.
    """
    hidden, gold, stats, mask = model.member_features(input_ids, attention_mask, labels)
    return [h[mask] for h in hidden], gold[mask], stats[mask]


def member_dtypes(model: Any) -> list[torch.dtype]:
    return [next(m.parameters()).dtype for m in model.members]


# ---------------------------------------------------------------------------------------------- cache key
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def member_fingerprint(info: Any) -> dict[str, Any]:
    """What identifies a member's weights: id, path, revision, plus the files of a local folder; for an
    adapter member (:mod:`salm.adapters`) the same of its adapter, whose weights are small enough to hash whole.

    Local folders add the config's content hash and every weight file's size and mtime (hashing GBs of
    weights would cost as much as extraction); hub ids add the cached snapshot's commit when known.
    """
    fp: dict[str, Any] = {"id": info.id, "path": info.path, "revision": info.revision}
    fp.update(_source_fingerprint(info.path, info.revision, "config.json", hash_weights=False))
    if getattr(info, "adapter", None):
        fp["adapter"] = {"path": info.adapter, "revision": info.adapter_revision}
        fp["adapter"].update(_source_fingerprint(info.adapter, info.adapter_revision, "adapter_config.json", True))
    return fp


def _source_fingerprint(path: str, revision: str | None, config_name: str, hash_weights: bool) -> dict[str, Any]:
    fp: dict[str, Any] = {}
    folder = Path(path).expanduser()
    if folder.is_dir():
        cfg = folder / config_name
        fp["config_sha256"] = _sha256_file(cfg) if cfg.is_file() else None
        weights = [
            p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf")
        ]
        if hash_weights:
            fp["files"] = sorted([p.name, _sha256_file(p)] for p in weights)
        else:
            fp["files"] = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights)
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cfg = try_to_load_from_cache(path, config_name, revision=revision)
            if isinstance(cfg, str):
                fp["snapshot"] = Path(cfg).parent.name
                fp["config_sha256"] = _sha256_file(Path(cfg))
        except Exception:  # noqa: BLE001 - the fingerprint is best effort beyond id/path/revision
            pass
    return fp


def vocab_hash(tokenizer: Any) -> str:
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([items, tokenizer.eos_token_id]).encode()).hexdigest()


def key_material(model: Any, split: TokenizedSplit, max_length: int, loss_on: str) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "members": [member_fingerprint(info) for info in model.infos],
        "dtypes": [str(d) for d in member_dtypes(model)],
        "vocab_sha256": vocab_hash(model.tokenizer),
        "vocab_size": model.vocab_size,
        "split": split.name,
        "data_sha256": split.content_hash(),
        "n_examples": len(split),
        "max_length": max_length,
        "loss_on": loss_on,
    }


def cache_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- the cache
@dataclass
class Dist:
    """Which process this is, for feature extraction under ``accelerate launch`` (rank 0 alone by default)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None


def _disk_free(folder: Path) -> int:
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


class CachedFeatures:
    """One split's features, memory-mapped from disk; ``batch(indices)`` is what a training step reads."""

    def __init__(self, path: Path, manifest: dict[str, Any], reused: bool):
        self.path, self.manifest, self.reused = path, manifest, reused
        self.key = manifest["key"]
        n, p = manifest["n_examples"], manifest["n_positions"]
        self.offsets = np.fromfile(path / "offsets.bin", dtype=np.int64, count=n + 1)
        self.hidden = []
        self.views = []
        for i, (hsize, dt) in enumerate(zip(manifest["hidden_sizes"], manifest["dtypes"])):
            np_dt, torch_dt = _STORAGE[getattr(torch, dt.split(".")[-1])]
            self.hidden.append(np.memmap(path / f"hidden_{i}.bin", dtype=np_dt, mode="r", shape=(max(p, 1), hsize)))
            self.views.append(torch_dt)
        self.gold = np.memmap(path / "gold.bin", dtype=np.float32, mode="r", shape=(max(p, 1), manifest["n_members"]))
        self.stats = np.memmap(path / "stats.bin", dtype=np.float32, mode="r", shape=(max(p, 1), manifest["stats_dim"]))
        self.nbytes = manifest["nbytes"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(
        self, indices: Sequence[int], device: torch.device | str = "cpu"
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Hidden states per member ``[P, H_m]``, gold log-probs ``[P, M]`` and confidence statistics ``[P, F]``
        of the examples, in ``indices`` order."""
        # One example is one contiguous run of rows: slices of the memmap, no fancy indexing.
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in indices]
        hidden = [torch.from_numpy(_take(h, spans)).view(v).to(device) for h, v in zip(self.hidden, self.views)]
        gold = torch.from_numpy(_take(self.gold, spans)).to(device)
        return hidden, gold, torch.from_numpy(_take(self.stats, spans)).to(device)


def _take(arr: np.memmap, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([arr[a:b] for a, b in spans]) if spans else np.zeros((0, arr.shape[1]), arr.dtype)


def _valid(path: Path, key: str) -> dict[str, Any] | None:
    """The manifest of a complete cache for ``key`` at ``path``, or None (missing, partial, other key, truncated)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key or manifest.get("format_version") != FORMAT_VERSION:
        return None
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return None
    return manifest


def _extraction_order(lengths: Sequence[int], tokens: int) -> list[list[int]]:
    """Batches of example indices, longest first, each under ``tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * width > tokens or len(cur) >= EXTRACT_MAX_BATCH):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def extract_features(
    model: Any,
    split: TokenizedSplit,
    folder: Path,
    offsets: np.ndarray,
    indices: Sequence[int],
    progress: bool = True,
) -> None:
    """Run the members over ``indices`` and write their features into the preallocated files in ``folder``."""
    from tqdm.auto import tqdm

    storage = [_STORAGE[d] for d in member_dtypes(model)]
    p = int(offsets[-1])
    hidden = [
        np.memmap(folder / f"hidden_{i}.bin", dtype=s[0], mode="r+", shape=(max(p, 1), h))
        for i, (s, h) in enumerate(zip(storage, model.hidden_sizes))
    ]
    gold = np.memmap(folder / "gold.bin", dtype=np.float32, mode="r+", shape=(max(p, 1), len(model.members)))
    stats = np.memmap(
        folder / "stats.bin", dtype=np.float32, mode="r+", shape=(max(p, 1), stored_dim(len(model.members)))
    )
    lengths = [len(x) for x in split.input_ids]
    dev = model.member_device(0).type
    batches = _extraction_order(
        [lengths[i] for i in indices], EXTRACT_BATCH_TOKENS.get(dev, EXTRACT_BATCH_TOKENS["default"])
    )
    pad = model.tokenizer.pad_token_id
    with tqdm(total=len(indices), desc=f"features ({split.name})", unit="ex", disable=not progress) as bar:
        for b in batches:
            ex = [indices[j] for j in b]
            hs, g, st = compute_features(model, *collate(split, ex, pad))
            counts = [int(offsets[i + 1] - offsets[i]) for i in ex]
            g, st = g.cpu().numpy(), st.cpu().numpy()
            hs = [h.cpu() for h in hs]
            hs = [(h.view(torch.int16) if h.dtype == torch.bfloat16 else h).numpy() for h in hs]
            start = 0
            for i, n in zip(ex, counts):
                o = int(offsets[i])
                for dst, src in zip(hidden, hs):
                    dst[o : o + n] = src[start : start + n]
                gold[o : o + n] = g[start : start + n]
                stats[o : o + n] = st[start : start + n]
                start += n
            bar.update(len(ex))
    for a in (*hidden, gold, stats):
        a.flush()
    del hidden, gold, stats


def load_or_build(
    model: Any,
    split: TokenizedSplit,
    cache_dir: str | os.PathLike,
    *,
    max_length: int,
    loss_on: str,
    dist: Dist | None = None,
    progress: bool = True,
) -> CachedFeatures:
    """The split's cached features: reused when a complete cache with the same key exists, else extracted.

    Stages: find a complete cache under the key -> plan the files -> preallocate them in a temporary
    folder -> extract -> write the manifest and rename the folder into place. Under several processes
    (``dist.world > 1``) each process extracts every ``world``-th example into the same preallocated files
    (positions are known up front), and rank 0 does the rest.
    """
    dist = dist or Dist()
    cache_dir = Path(cache_dir).expanduser()
    material = key_material(model, split, max_length, loss_on)
    key = cache_key(material)
    final = cache_dir / f"{split.name}-{key[:16]}"
    manifest = _valid(final, key)
    dist.barrier()
    if manifest is not None:
        if dist.rank == 0:
            print(f"feature cache: reusing {final} ({human_bytes(manifest['nbytes'])})", file=sys.stderr)
        return CachedFeatures(final, manifest, reused=True)

    offsets, files = _plan_files(model, split)
    # Named by its owner so a later run can remove it once that process is dead (salm.io.stale_temporaries);
    # several processes share one folder named for the launch, which each new launch rebuilds.
    tmp = cache_dir / f".{final.name}.tmp-{owner_tag() if dist.world == 1 else 'dist'}"
    if dist.rank == 0:
        need = sum(files.values())
        print(
            f"feature cache: {split.name}: {len(split)} examples, {int(offsets[-1])} loss positions, "
            f"{len(model.members)} members -> {human_bytes(need)} in {final}",
            file=sys.stderr,
        )
        _preallocate(tmp, offsets, files)
    dist.barrier()
    extract_features(model, split, tmp, offsets, list(range(dist.rank, len(split), dist.world)), progress)
    dist.barrier()
    manifest = _manifest(model, split, key, material, offsets, files)
    if dist.rank == 0:
        _publish(tmp, final, manifest)
    dist.barrier()
    return CachedFeatures(final, manifest, reused=False)


def _plan_files(model: Any, split: TokenizedSplit) -> tuple[np.ndarray, dict[str, int]]:
    """Example offsets into the position rows, and every cache file's size in bytes (known before extraction)."""
    offsets = np.zeros(len(split) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(split.n_positions)
    rows = max(int(offsets[-1]), 1)
    storage = [_STORAGE[d] for d in member_dtypes(model)]
    files = {
        f"hidden_{i}.bin": rows * h * np.dtype(s[0]).itemsize
        for i, (s, h) in enumerate(zip(storage, model.hidden_sizes))
    }
    files["gold.bin"] = rows * len(model.members) * 4
    files["stats.bin"] = rows * stored_dim(len(model.members)) * 4
    files["offsets.bin"] = offsets.nbytes
    return offsets, files


def _preallocate(tmp: Path, offsets: np.ndarray, files: dict[str, int]) -> None:
    """A fresh ``tmp`` holding the offsets and every feature file at full size, after checking the disk has room."""
    need, free = sum(files.values()), _disk_free(tmp.parent)
    if need > free:
        raise FeatureCacheError(
            f"not enough disk space for the feature cache in {tmp.parent}: needs {need} bytes "
            f"({human_bytes(need)}), {free} bytes ({human_bytes(free)}) free; pass --feature_cache_dir on a "
            "larger disk, or --no_feature_cache to run the members every step"
        )
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    offsets.tofile(tmp / "offsets.bin")
    for name, size in files.items():
        if name != "offsets.bin":
            with (tmp / name).open("wb") as f:
                f.truncate(size)


def _manifest(
    model: Any, split: TokenizedSplit, key: str, material: dict[str, Any], offsets: np.ndarray, files: dict[str, int]
) -> dict[str, Any]:
    """What ``manifest.json`` records: the key and its ingredients, the shapes and the files' sizes."""
    return {
        "format_version": FORMAT_VERSION,
        "key": key,
        "material": material,
        "n_examples": len(split),
        "n_positions": int(offsets[-1]),
        "n_members": len(model.members),
        "stats_dim": stored_dim(len(model.members)),
        "member_ids": list(model.model_ids),
        "hidden_sizes": list(model.hidden_sizes),
        "dtypes": [str(d) for d in member_dtypes(model)],
        "files": files,
        "nbytes": sum(files.values()),
    }


def _publish(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest last (its presence marks ``tmp`` complete), then rename ``tmp`` to ``final``."""
    atomic_write_json(tmp / MANIFEST, manifest)
    if final.exists():  # a partial or stale folder under our key's name
        shutil.rmtree(final)
    try:
        os.replace(tmp, final)
    except OSError:  # another run renamed a complete cache first: use it, drop ours
        if _valid(final, manifest["key"]) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


class LiveFeatures:
    """``--no_feature_cache``: the same ``batch(indices)`` as :class:`CachedFeatures`, running the members each time."""

    reused = False
    nbytes = 0

    def __init__(self, model: Any, split: TokenizedSplit):
        self.model, self.split = model, split

    def __len__(self) -> int:
        return len(self.split)

    def batch(
        self, indices: Sequence[int], device: torch.device | str = "cpu"
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        ids, mask, labels = collate(self.split, list(indices), self.model.tokenizer.pad_token_id)
        hidden, gold, stats = compute_features(self.model, ids, mask, labels)
        return [h.to(device) for h in hidden], gold.to(device), stats.to(device)
