"""The CPU: what it multiplies natively, the members' dtype there, and the kernels their linear layers use.

Decoding a few sequences on a CPU is bound by reading the weights, so two things decide its speed:

- **dtype.** bfloat16 halves the bytes read, but only pays where the CPU multiplies bf16 natively
  (``avx512_bf16`` or AMX on x86, the ``bf16`` feature on Arm); elsewhere oneDNN emulates it and a decode
  step grows with the batch. :func:`auto_dtype` picks bf16 there and float32 everywhere else.
- **kernels.** ``torch.nn.functional.linear`` goes to MKL's sgemm in float32, whose small-batch path
  depends on the CPU: with its AVX-512 kernels (Intel) a linear at batch 4 costs twice batch 1's and at
  batch 8 three times; with its AVX2 kernels (what AMD CPUs get) batch 2 already costs about twice.
  bfloat16 linears on the plain weight run oneDNN's matmul about 1.6x slower than on a pre-blocked one.
  :func:`pack_linear_weights` lays a member's linear weights out once, at load, in oneDNN's blocked format
  and runs them through oneDNN, whose cost stays flat to batch 6 (1.3x at 8) with its AVX-512 kernels and
  grows 1.25x to batch 4 (1.7x at 8) with its AVX2 ones, where MKL's grow 2x and 2.8x (one linear, 896 x
  4864, this machine; ``benchmarks/bench_decode.py`` measures whole decode steps).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPE_ENV = "SALM_CPU_DTYPE"
"""Overrides what ``dtype="auto"`` picks on the CPU (``float32`` or ``bfloat16``); an explicit dtype wins."""
PACK_ENV = "SALM_CPU_PACK"
"""``0``: members keep PyTorch's linear kernels; ``1``: always :func:`pack_linear_weights`; unset: by size."""
PACK_MIN_BYTES = 32 << 20
"""Members with fewer bytes of linear weights stay unpacked: their weights sit in the caches, so a step is bound by
per-call overhead, where oneDNN's (about 15 us a call here) exceeds MKL's (about 5 us)."""

# oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``) below which it only emulates bf16, whatever the CPU has.
_NO_BF16_ISAS = {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni"}
_FLAGS = ("avx2", "avx512_f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_ne_convert", "bf16")


@dataclass(frozen=True)
class CpuInfo:
    """What the results files record about the CPU (``to_dict``)."""

    model: str
    flags: tuple[str, ...]  # those of _FLAGS the CPU has
    capability: str  # ATen's kernels (``ATEN_CPU_CAPABILITY`` pins them): DEFAULT, AVX2, AVX512, ...
    native_bf16: bool
    threads: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = list(self.flags)
        return d


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _flags() -> tuple[str, ...]:
    caps: dict[str, Any] = {}
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # noqa: BLE001 - older torch or an unknown CPU: fall back to /proc/cpuinfo
        pass
    have = {k for k, v in caps.items() if v is True}
    listed = set((_cpuinfo_field("flags") or _cpuinfo_field("Features") or "").split())
    have |= {"avx512_f" if f == "avx512f" else f for f in listed}
    return tuple(f for f in _FLAGS if f in have)


def _onednn_bf16_capped() -> bool:
    """Whether ``ONEDNN_MAX_CPU_ISA`` (or its old name) keeps oneDNN below its native bf16 kernels."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().lower()
    return cap in _NO_BF16_ISAS


@functools.cache
def cpu_info() -> CpuInfo:
    flags = _flags()
    native = bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))
    try:
        native = native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and not _onednn_bf16_capped()
    except (AttributeError, RuntimeError):  # a torch without oneDNN: its own bf16 kernels are slow
        native = False
    return CpuInfo(
        model=cpu_model(),
        flags=flags,
        capability=torch.backends.cpu.get_cpu_capability(),
        native_bf16=native,
        threads=torch.get_num_threads(),
    )


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (avx512_bf16 or AMX, or Arm's bf16) and oneDNN may use it."""
    return cpu_info().native_bf16


def auto_dtype() -> torch.dtype:
    """The members' dtype on this CPU: ``$SALM_CPU_DTYPE`` if set, else bf16 where it is native, else fp32."""
    forced = os.environ.get(DTYPE_ENV, "").strip()
    if forced:
        dtype = getattr(torch, forced, None)
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{DTYPE_ENV}={forced!r}: use float32 or bfloat16")
        return dtype
    return torch.bfloat16 if native_bf16() else torch.float32


def why_dtype(dtype: torch.dtype) -> str:
    """One line: which dtype ``auto`` chose on this CPU and why."""
    name = str(dtype).replace("torch.", "")
    if os.environ.get(DTYPE_ENV, "").strip():
        return f"members run in {name} on the CPU (${DTYPE_ENV})"
    info = cpu_info()
    if dtype == torch.bfloat16:
        native = ", ".join(f for f in info.flags if f in ("avx512_bf16", "amx_bf16", "bf16"))
        return (
            f"members run in bfloat16: this CPU ({info.model}) multiplies it natively ({native}); "
            "--dtype float32 for full precision"
        )
    return f"members run in float32: this CPU ({info.model}) has no native bfloat16 multiply"


_announced: set[str] = set()


def announce(dtype: torch.dtype) -> None:
    """Print the choice of ``dtype="auto"`` on the CPU to stderr, once per process (not when ``$SALM_CPU_DTYPE``
    made it: like an explicit ``--dtype``, that is the user's own choice)."""
    if os.environ.get(DTYPE_ENV, "").strip():
        return
    line = why_dtype(dtype)
    if line not in _announced:
        _announced.add(line)
        print(f"salm: {line}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ packed linears
@torch.library.custom_op("salm::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_packed_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class PackedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight lives in oneDNN's blocked layout (inference only, no gradient).

    Eager calls go straight to oneDNN; under ``torch.compile`` the call is one opaque op (inductor's own
    lowering of oneDNN linears only takes weights it froze itself).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(w, None), persistent=False)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        if torch.compiler.is_compiling():
            return _packed_linear_op(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def should_pack(model: nn.Module) -> bool:
    """Whether :func:`salm.members.load_member_model` packs ``model``: ``$SALM_CPU_PACK`` (0/1) if set, else when
    its linear weights reach :data:`PACK_MIN_BYTES` (real LMs do; the quickstart's and the tests' tiny members
    do not, so their numbers stay those of PyTorch's kernels)."""
    setting = os.environ.get(PACK_ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if not can_pack(model):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    linear = (m.weight for m in model.modules() if type(m) is nn.Linear)
    return sum(w.numel() * w.element_size() for w in linear) >= PACK_MIN_BYTES


def pack_if_worthwhile(model: nn.Module, device: str | torch.device) -> int:
    """Pack ``model``'s linear layers when it sits on the CPU and :func:`should_pack` says so; returns how many.
    The one rule for a plain member (at load) and an adapter base (once PEFT has wrapped its layers)."""
    if torch.device(device).type != "cpu" or not should_pack(model):
        return 0
    return pack_linear_weights(model)


def can_pack(model: nn.Module) -> bool:
    """Whether ``model``'s linear layers can be packed: on the CPU, float32 or bfloat16, oneDNN present."""
    p = next(model.parameters(), None)
    return (
        p is not None
        and p.device.type == "cpu"
        and p.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def pack_linear_weights(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of a frozen CPU model by a :class:`PackedLinear`; returns how many. PEFT's
    ``lora_A``/``lora_B`` layers stay as they are (an adapter-wrapped layer's ``base_layer`` is packed; see
    :func:`salm.adapters.load_member_models`).

    A weight that another module shares (a tied LM head and input embedding) is packed as a copy in float32: the
    embedding keeps reading the dense rows. That costs the matrix once more in memory (545 MB for Qwen2.5-0.5B)
    but MKL's float32 head grows 2.5x from batch 1 to 4 where the packed one grows 1.1x. In bfloat16 the tied
    head stays as it is: oneDNN's plain bf16 head is flat in the batch, packing would save ~25% of the head's
    time (~10% of a step) for 15% more memory (measured on Qwen2.5-0.5B's 151,936 x 896 head).
    """
    if not can_pack(model):
        return 0
    shared = {  # storage of weights that modules other than linear layers read (a tied input embedding)
        p.data_ptr() for m in model.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)
    }
    n = 0
    for path, parent in list(model.named_modules()):
        if any(part.startswith("lora_") for part in path.split(".")):
            continue  # PEFT's LoRA matrices (salm.adapters reads and stacks them as plain weights)
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in (torch.float32, torch.bfloat16):
                if child.weight.dtype == torch.bfloat16 and child.weight.data_ptr() in shared:
                    continue  # a tied bf16 head: packing would copy it for ~10% of a step (fp32: 2x at batch 4)
                setattr(parent, name, PackedLinear(child))
                n += 1
    if n:
        release_file_pages(model)
    return n


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (a hint; no data is lost, dirty pages are kept)


def release_file_pages(model: nn.Module) -> int:
    """Hand back to the kernel the resident pages of the checkpoint files ``model``'s tensors are mapped from;
    returns the bytes advised (0 where this is not Linux or the kernel refuses).

    Hugging Face loads safetensors checkpoints memory-mapped, and the tensors left after packing (a tied
    embedding, norms) keep the whole file mapped. Packing read every page of it, so without this the dense
    copies stay resident beside the packed ones: Qwen2.5-Coder-0.5B with three adapters took 2.42 GB of net RSS
    packed against 1.43 GB after this call (psutil's ``shared`` 1.11 -> 0.12 GB). ``MADV_PAGEOUT`` only
    reclaims: pages still in use fault back in from the page cache, and nothing is discarded.
    """
    if not sys.platform.startswith("linux"):
        return 0
    ptrs = []
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.layout == torch.strided:  # not a packed (oneDNN) weight
            ptrs.append(t.untyped_storage().data_ptr())
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return 0
    ranges = []
    for line in maps:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith("(deleted)"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if any(start <= p < end for p in ptrs):
                ranges.append((start, end))
    if not ranges:
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(end - start for start, end in ranges if libc.madvise(start, end - start, _MADV_PAGEOUT) == 0)


def compute_record(model: Any) -> dict[str, Any]:
    """What a results file records about how the members computed: dtype and device, and on the CPU which
    CPU (model, flags, ATen capability, native bf16, threads) and whether the linear layers were packed."""
    devices = sorted({str(next(m.parameters()).device) for m in model.members})
    rec: dict[str, Any] = {"dtype": str(model.dtype).replace("torch.", ""), "devices": devices}
    if any(d.startswith("cpu") for d in devices):
        packed = any(isinstance(x, PackedLinear) for m in model.members for x in m.modules())
        rec["cpu"] = {**cpu_info().to_dict(), "threads": torch.get_num_threads(), "packed_linears": packed}
    return rec
