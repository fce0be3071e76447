"""Where the time of one decode step goes: the ensemble's routed step vs a member's own HF ``generate``.

On a GPU, batch-1/8 decoding of 1.5B models is bound by kernel launches and Python, not by the GPU, so
the telling numbers are CPU-side: kernel launches and CPU time per generated token, per member.

    python benchmarks/profile_generation.py --device cuda --out "$OUT/profile_gpu.txt"
    python benchmarks/profile_generation.py --device cpu --layers 2     # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_generation  # noqa: E402
import common  # noqa: E402


def profile(fn, device: str):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    common.sync(device)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        fn()
        common.sync(device)
        wall = time.perf_counter() - t
    return prof, wall


def launches(prof) -> int:
    return sum(
        e.count for e in prof.key_averages() if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tok, members, ensembles = bench_generation.build("qwen2.5-1.5b", args.layers, 3, dtype, args.device)
    ens = ensembles[3]
    texts, ids = common.fixed_length_prompts(tok, args.batch, 64)
    ids_t = torch.tensor(ids, device=args.device)
    runs = {
        "ensemble (N=3)": bench_generation.ensemble_run(ens, texts, args.new_tokens),
        "member m0 HF generate": bench_generation.member_run(members[0], ids_t, args.new_tokens, tok.pad_token_id),
    }
    lines = [f"device {args.device}, batch {args.batch}, {args.new_tokens} new tokens, prompt 64, {dtype}"]
    for name, fn in runs.items():
        fn()  # warm-up
        fn()
        prof, wall = profile(fn, args.device)
        steps = args.new_tokens * (3 if name.startswith("ensemble") else 1)  # member-steps
        lines.append(
            f"\n== {name}: wall {wall * 1e3:.1f} ms, {wall * 1e3 / steps:.2f} ms per member-step, "
            f"{launches(prof) / steps:.0f} kernel launches per member-step"
        )
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
