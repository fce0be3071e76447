"""Shared helpers for the saLM benchmarks.

Members are built with the real Qwen2.5 architectures and random weights (decoding speed does not depend
on weight values), so no download is needed. Every timed figure is compared with a baseline measured in
the same run on the same machine; repeats are interleaved and summarised by their median.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(1, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The published configs (config.json of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B).
ARCHS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960
    ),
}
QWEN25_SHARED = dict(
    vocab_size=151936,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    hidden_act="silu",
)


def qwen_config(arch: str, tokenizer: Any, layers: int | None = None):
    """Qwen2Config of a published Qwen2.5 size; ``layers`` overrides the depth (for ``--quick``)."""
    from transformers import Qwen2Config

    kw = dict(QWEN25_SHARED, **ARCHS[arch])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    kw["max_window_layers"] = kw["num_hidden_layers"]
    return Qwen2Config(
        **kw, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )


def build_random_member(config: Any, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A Qwen2ForCausalLM with N(0, 0.02) weights, allocated directly on ``device`` (HF's slow init skipped)."""
    from transformers import Qwen2ForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.tie_weights()
    model.to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.eval()
    model.requires_grad_(False)
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct parameters and buffers (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_mkldnn:  # a packed linear weight (salm.cpu): opaque, never shared
            total += t.numel() * t.element_size()
            continue
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def bench_tokenizer():
    """The small byte-level BPE of ``salm.testing`` (its ids all lie inside the members' 151936-row vocab)."""
    from salm.testing import build_tokenizer

    return build_tokenizer(vocab_size=2000)


def fixed_length_prompts(tokenizer: Any, n: int, length: int, seed: int = 0) -> tuple[list[str], list[list[int]]]:
    """``n`` prompt strings that each tokenize to exactly ``length`` ids, and those ids.

    Random non-special ids are decoded and re-encoded until the text round-trips, so the string our
    ``generate`` receives and the ids fed to Hugging Face ``generate`` are the same ``length`` tokens.
    """
    special = set(tokenizer.all_special_ids)
    pool = [i for i in range(len(tokenizer)) if i not in special]
    g = torch.Generator().manual_seed(seed)
    texts, ids = [], []
    while len(texts) < n:
        draw = [pool[j] for j in torch.randint(len(pool), (length + 16,), generator=g).tolist()]
        enc = tokenizer(tokenizer.decode(draw))["input_ids"][:length]
        text = tokenizer.decode(enc)
        if len(enc) == length and tokenizer(text)["input_ids"] == enc and not special & set(enc):
            texts.append(text)
            ids.append(enc)
    return texts, ids


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def summary(xs: Sequence[float]) -> dict[str, Any]:
    return {"median": median(xs), "min": float(min(xs)), "max": float(max(xs)), "runs": [float(x) for x in xs]}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "salm"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except OSError:
        return None


# Variables that pick CPU kernels (and so change speed and the last bits of results): recorded when set.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS",
              "SALM_CPU_DTYPE", "SALM_CPU_PACK")  # fmt: skip


def environment(device: str = "cpu") -> dict[str, Any]:
    import transformers

    from salm.cpu import cpu_info

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_info": cpu_info().to_dict(),  # flags (avx512_bf16, amx_bf16, ...), ATen capability, native bf16
        "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
        "cpu_cores": core_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": None,
        "git_commit": git_commit(),
        "load_average_at_start": load_average(),
    }
    try:
        import psutil

        env["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["device_name"] = props.name
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = "cpu"
    return env


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def others_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) used so far by every other process, by pid (empty without psutil)."""
    try:
        import psutil
    except ImportError:
        return {}
    me = os.getpid()
    out = {}
    for p in psutil.process_iter(["pid", "cpu_times", "create_time"]):
        t = p.info.get("cpu_times")
        if p.info["pid"] != me and t is not None:
            out[p.info["pid"]] = t.user + t.system
    return out


class Contention:
    """How busy other processes kept the CPUs during a window: mean cores they used (0 = quiet machine)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.start = others_cpu_seconds()

    def cores_used_by_others(self) -> float | None:
        if not self.start:
            return None
        end = others_cpu_seconds()
        used = sum(v - self.start.get(pid, 0.0) for pid, v in end.items())
        return max(used, 0.0) / max(time.perf_counter() - self.t0, 1e-9)


def wait_for_quiet(max_wait_s: float, threshold_cores: float = 0.3, window_s: float = 2.0) -> float:
    """Wait (at most ``max_wait_s``) until other processes use under ``threshold_cores``; returns seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        c = Contention()
        time.sleep(window_s)
        used = c.cores_used_by_others()
        if used is None or used < threshold_cores:
            break
    return time.perf_counter() - t0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_repeat(
    r: int,
    batch_sizes: Sequence[int],
    reps: dict[int, int],
    jobs: dict[int, dict[str, Callable[[], Any]]],
    times: dict[int, dict[str, list[float]]],
    device: str | torch.device,
    wait_quiet_s: float = 0.0,
) -> dict[str, Any]:
    """Repeat ``r`` of every job of every batch size still repeating, appended to ``times``; the order rotates
    with ``r`` (over batch sizes and over jobs) so no job always runs first or after the same neighbour.
    Returns the repeat's record: which batch sizes ran, how long it waited for quiet CPUs, its wall time and
    the cores other processes used meanwhile."""
    waited = wait_for_quiet(wait_quiet_s) if wait_quiet_s > 0 else 0.0
    window = Contention()
    t_rep = time.perf_counter()
    active = [bs for bs in batch_sizes if r < reps[bs]]
    for bs in active[r % len(active) :] + active[: r % len(active)]:
        names = list(jobs[bs])
        for name in names[r % len(names) :] + names[: r % len(names)]:
            dt, _ = timed(jobs[bs][name], device)
            times[bs][name].append(dt)
    others = window.cores_used_by_others()
    return {
        "repeat": r + 1,
        "batch_sizes": active,
        "waited_for_quiet_s": round(waited, 1),
        "wall_s": round(time.perf_counter() - t_rep, 1),
        "cpu_cores_used_by_other_processes": None if others is None else round(others, 3),
    }


def train_quickstart_heads(
    members_file: str | Path, data: Any, out: str | Path, seed: int = 0, model: Any = None, **overrides: Any
):
    """Heads trained by ``salm train``'s code with ``salm quickstart``'s settings (``overrides`` on top, e.g.
    ``router=``), on ``data`` (a :class:`salm.data.TrainingData`); returns the ensemble with the
    best-validation heads loaded, in eval mode. ``model`` reuses loaded members; features are cached under
    ``out/feature_cache`` unless ``feature_cache_dir`` is given."""
    from salm.quickstart.run import QuickstartSettings
    from salm.training import train

    out = Path(out)
    overrides.setdefault("feature_cache_dir", str(out / "feature_cache"))
    cfg = QuickstartSettings(seed=seed, plots=False, progress=False).train_config(
        members_file, out / "heads", **overrides
    )
    return train(cfg, model=model, data=data).best_model()
