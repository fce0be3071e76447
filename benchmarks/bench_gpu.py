"""Routed generation on one GPU: three Qwen2.5-1.5B-architecture members (random weights, bf16).

The same measurement as ``bench_generation.py`` (ensemble vs the sum of the members' own Hugging Face
``generate``, interleaved repeats, medians) plus the memory-bandwidth floor: a decode step must read every
member's weights once, so no step can beat sum(weight bytes) / bandwidth.

    python benchmarks/bench_gpu.py --out benchmarks/results/generation_gpu.json   # ~2-3 min on one H100
    python benchmarks/bench_gpu.py --quick --device cpu                          # smoke test without a GPU
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_generation  # noqa: E402
import common  # noqa: E402

# Peak memory bandwidth, bytes/s, by device name (datasheet figures). Most specific pattern first.
BANDWIDTH: list[tuple[tuple[str, ...], float, str]] = [
    (("H200",), 4.8e12, "H200 HBM3e 4.8 TB/s"),
    (("H100", "NVL"), 3.9e12, "H100 NVL HBM3 3.9 TB/s"),
    (("H100", "PCIE"), 2.0e12, "H100 PCIe HBM2e 2.0 TB/s"),
    (("H100",), 3.35e12, "H100 SXM HBM3 3.35 TB/s"),
    (("A100", "80GB"), 2.039e12, "A100 80GB SXM HBM2e 2.04 TB/s"),
    (("A100",), 1.555e12, "A100 40GB HBM2 1.56 TB/s"),
    (("L40S",), 0.864e12, "L40S GDDR6 864 GB/s"),
    (("L4",), 0.3e12, "L4 GDDR6 300 GB/s"),
]


def assumed_bandwidth(device_name: str) -> tuple[float | None, str]:
    name = device_name.upper()
    for keys, bw, label in BANDWIDTH:
        if all(k in name for k in keys):
            return bw, label
    return None, f"unknown for {device_name!r}: pass --bandwidth-gbs"


def floor_figures(result: dict[str, Any], bandwidth: float | None) -> list[dict[str, Any]]:
    """Per (batch, N): measured time per token/step against sum(weight bytes) / bandwidth."""
    per_member = result["setup"]["weight_bytes_per_member"]
    out = []
    for r in result["results"]:
        n, bs, new = r["n_members"], r["batch_size"], result["setup"]["new_tokens"]
        total_bytes = n * per_member
        floor = total_bytes / bandwidth if bandwidth else None
        per_step = r["ensemble_time_s"]["median"] / new  # one step = one token per row, prefill amortised
        row = {
            "batch_size": bs,
            "n_members": n,
            "weight_bytes_total": total_bytes,
            "floor_s_per_step": floor,
            "ensemble_s_per_step_incl_prefill": per_step,
            "ensemble_ms_per_token": 1e3 * r["ensemble_time_s"]["median"] / (new * bs),
            "members_sum_s_per_step_incl_prefill": r["members_sum_time_s"]["median"] / new,
            "ratio_ensemble_over_members_sum": r["ratio_ensemble_over_members_sum"]["median"],
        }
        if "ensemble_decode_s_per_step" in r:
            row["ensemble_decode_s_per_step"] = r["ensemble_decode_s_per_step"]
            row["members_sum_decode_s_per_step"] = r["members_sum_decode_s_per_step"]
        if floor:
            row["ensemble_over_floor"] = row.get("ensemble_decode_s_per_step", per_step) / floor
            row["members_sum_over_floor"] = row.get("members_sum_decode_s_per_step", per_step) / floor
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    default_out = str(common.RESULTS / "generation_gpu.json")
    p = bench_generation.parser(__doc__.splitlines()[0], default_out)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test with --quick)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: bf16 on GPU")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="override the assumed memory bandwidth (GB/s)")
    p.set_defaults(members=[3], seed_members=[3], split_prefill=True)
    args = p.parse_args(argv)
    bench_generation.finish_args(args, default_out, "salm_generation_gpu_quick.json")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device; for a smoke test use --quick --device cpu")
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or common.core_count())
    result = bench_generation.run(args, args.device, dtype, "qwen2.5-1.5b", 2 if args.quick else None)
    result["benchmark"] = "generation_gpu"
    device_name = result["environment"]["device_name"]
    if args.bandwidth_gbs:
        bw, label = args.bandwidth_gbs * 1e9, f"given: {args.bandwidth_gbs} GB/s"
    else:
        bw, label = assumed_bandwidth(device_name)
    result["bandwidth"] = {"assumed_bytes_per_s": bw, "source": label}
    result["bandwidth_floor"] = floor_figures(result, bw)
    if args.device.startswith("cuda"):
        result["environment"]["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    path = common.write_json(args.out, result)
    bench_generation.print_summary(result)
    for f in result["bandwidth_floor"]:
        if f["floor_s_per_step"]:
            print(
                f"batch {f['batch_size']} N={f['n_members']}: "
                f"{1e3 * f.get('ensemble_decode_s_per_step', f['ensemble_s_per_step_incl_prefill']):.2f} ms/step, "
                f"floor {1e3 * f['floor_s_per_step']:.2f} ms ({label}), x{f['ensemble_over_floor']:.1f}"
            )
    common.log(f"wrote {path} in {result['runtime_s']:.0f}s on {device_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
