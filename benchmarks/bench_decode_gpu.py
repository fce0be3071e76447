"""Decode ms per step on one GPU against the memory-bandwidth floor, and the GSM8K evaluation time it implies.

Three Qwen2.5-1.5B-architecture members (random weights, bf16), argmax routing, greedy, EOS ignored, at batch
1, 8 and 32. Jobs (each also at 1 token, so ``(T(new) - T(1)) / (new - 1)`` is the decode time per step):

- ``ensemble_compiled``: ``generate(compile=True)`` — static caches, the whole step (3 members, heads) as
  one CUDA graph (``torch.compile(mode="reduce-overhead")``);
- ``ensemble_dynamic``: today's default path (``DynamicCache``, eager);
- ``member0_routed_compiled``: ``routing="member:m0"`` compiled (what evaluating one member costs);
- ``member0_hf`` / ``member0_hf_compiled``: member 0's own ``generate``, default and with HF's static cache +
  ``compile_config``. The members share one architecture, so Σ over members = N × member 0 (timed once,
  which keeps the number of compilations — and the GPU time — small).

The floor is Σ weight bytes ÷ the HBM bandwidth (detected from the device name: H100 SXM 3.35 TB/s, H200
4.8 TB/s, ...; ``--bandwidth-gbs`` overrides). The evaluation extrapolation: ``--eval-prompts`` (1,319 GSM8K
test problems) in batches, every batch running ``--eval-new-tokens`` (512) steps — an upper bound, rows stop
early — for the ensemble plus each of the N members (member routing), against today's path where every
model ran all N members per step. Static caches are ``--cache-len`` (768) long, what GSM8K prompts + 512 tokens use.

    python benchmarks/bench_decode_gpu.py --out "$OUT/decode_gpu.json"     # ~5-8 min on one H100, compiles included
    python benchmarks/bench_decode_gpu.py --quick --device cpu             # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode  # noqa: E402
import bench_generation  # noqa: E402
import common  # noqa: E402
from bench_gpu import assumed_bandwidth  # noqa: E402


def build_jobs(tok: Any, member0: Any, ens: Any, bs: int, prompt_tokens: int, new_tokens: int, device: str):
    from salm.generation import encode_prompts

    texts, ids = common.fixed_length_prompts(tok, bs, prompt_tokens, seed=bs)
    assert encode_prompts(ens, texts) == ids
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    jobs: dict[str, Any] = {}
    for n, suffix in ((new_tokens, ""), (1, "@1")):
        jobs["ensemble_compiled" + suffix] = bench_decode.ensemble_job(ens, texts, n, compile=True)
        jobs["ensemble_dynamic" + suffix] = bench_decode.ensemble_job(ens, texts, n)
        jobs["member0_routed_compiled" + suffix] = bench_decode.ensemble_job(
            ens, texts, n, compile=True, routing="member:m0"
        )
        jobs["member0_hf" + suffix] = bench_decode.hf_job(member0, ids_t, n, tok.pad_token_id, compiled=False)
        jobs["member0_hf_compiled" + suffix] = bench_decode.hf_job(member0, ids_t, n, tok.pad_token_id, compiled=True)
    return jobs


def extrapolate(step: dict[str, float], prefill: dict[str, float], n: int, bs: int, args: argparse.Namespace):
    """Seconds for ``eval_prompts`` prompts × (ensemble + N members), every batch running ``eval_new_tokens`` steps."""
    batches = math.ceil(args.eval_prompts / bs)

    def model_time(job: str) -> float:
        return batches * (prefill[job] + args.eval_new_tokens * step[job])

    compiled = model_time("ensemble_compiled") + n * model_time("member0_routed_compiled")
    today = (1 + n) * model_time("ensemble_dynamic")  # before: member:<id> ran all N members too
    return {
        "batch_size": bs,
        "batches": batches,
        "compiled_s": compiled,
        "compiled_h": compiled / 3600,
        "previous_path_s": today,
        "previous_path_h": today / 3600,
        "speedup": today / compiled,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import salm.fast_decode as fast_decode

    bucket = args.cache_len  # one static cache length for every GSM8K-length sequence: one graph per batch size

    def one_bucket(needed: int, context: int | None) -> int:
        length = -(-needed // bucket) * bucket
        return max(needed, min(length, context)) if context else length

    fast_decode.cache_length = one_bucket
    t_start = time.perf_counter()
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    tok, members, ensembles = bench_generation.build(
        "qwen2.5-1.5b", 2 if args.quick else None, args.members, dtype, device
    )
    ens, n = ensembles[args.members], len(members)
    env = common.environment(device)
    if args.bandwidth_gbs:
        bw, label = args.bandwidth_gbs * 1e9, f"given: {args.bandwidth_gbs} GB/s"
    else:
        bw, label = assumed_bandwidth(env["device_name"])
    total_bytes = sum(common.weight_bytes(m) for m in members)
    floor = total_bytes / bw if bw else None
    rows, warm = [], {}
    for bs in args.batch_sizes:
        common.log(f"batch {bs}: warm-up (compilation and graph capture for this shape)")
        jobs = build_jobs(tok, members[0], ens, bs, args.prompt_tokens, args.new_tokens, device)
        warm[bs] = bench_decode.warm_up(jobs, device)
        times: dict[str, list[float]] = {k: [] for k in jobs}
        for r in range(args.repeats):
            names = list(jobs)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                dt, _ = common.timed(jobs[name], device)
                times[name].append(dt)
        step_runs = {k: bench_decode.per_step(times, k, args.new_tokens) for k in times if "@" not in k}
        step = {k: common.median(v) for k, v in step_runs.items()}
        prefill = {k: common.median(times[k + "@1"]) for k in step}
        best_hf = n * min(step["member0_hf"], step["member0_hf_compiled"])
        row: dict[str, Any] = {
            "batch_size": bs,
            "n_members": n,
            "repeats": args.repeats,
            "ms_per_step": {k: 1e3 * v for k, v in step.items()},
            "ms_per_step_runs": {k: [1e3 * x for x in v] for k, v in step_runs.items()},
            "prefill_plus_one_token_s": prefill,
            "members_sum_hf_ms_per_step": 1e3 * n * step["member0_hf"],
            "members_sum_hf_compiled_ms_per_step": 1e3 * n * step["member0_hf_compiled"],
            "ratio_compiled_over_best_hf_sum": step["ensemble_compiled"] / best_hf,
            "ratio_compiled_over_dynamic": step["ensemble_compiled"] / step["ensemble_dynamic"],
            "warmup_s": warm[bs],
            "gsm8k_evaluation": extrapolate(step, prefill, n, bs, args),
        }
        if floor:
            row["floor_ms_per_step"] = 1e3 * floor
            row["over_floor"] = {k: v / floor for k, v in step.items() if not k.startswith("member0")}
            row["over_floor"]["members_sum_hf"] = n * step["member0_hf"] / floor
            row["over_floor"]["members_sum_hf_compiled"] = n * step["member0_hf_compiled"] / floor
        rows.append(row)
        common.log(
            f"batch {bs}: compiled {row['ms_per_step']['ensemble_compiled']:.2f} ms/step, "
            f"dynamic {row['ms_per_step']['ensemble_dynamic']:.2f}" + (f", floor {1e3 * floor:.2f} ms" if floor else "")
        )
        if device.startswith("cuda"):
            env["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        write(args, result(args, env, dtype, members, total_bytes, bw, label, floor, ens, rows, t_start))
    return result(args, env, dtype, members, total_bytes, bw, label, floor, ens, rows, t_start)


def write(args: argparse.Namespace, res: dict[str, Any]) -> Path:
    """Written after every batch size: a run cut short by the device's time limit still leaves its numbers."""
    return common.write_json(args.out, res)


def result(args, env, dtype, members, total_bytes, bw, label, floor, ens, rows, t_start) -> dict[str, Any]:
    import salm.fast_decode as fast_decode

    b1 = next((r for r in rows if r["batch_size"] == 1), None)
    return {
        "benchmark": "decode_gpu",
        "quick": bool(args.quick),
        "environment": env,
        "setup": {
            "architecture": "qwen2.5-1.5b",
            "layers": members[0].config.num_hidden_layers,
            "dtype": str(dtype).replace("torch.", ""),
            "device": args.device,
            "weight_bytes_total": total_bytes,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "static_cache_len_bucket": args.cache_len,
            "repeats": args.repeats,
            "members_sum": "N x member 0 (identical architectures)",
            "eval_prompts": args.eval_prompts,
            "eval_new_tokens": args.eval_new_tokens,
        },
        "bandwidth": {"assumed_bytes_per_s": bw, "source": label, "floor_ms_per_step": floor and 1e3 * floor},
        "compile_warmups": [w.__dict__ for w in fast_decode.warmup_report(ens)],
        "results": rows,
        "targets": {
            "batch1_over_floor_max": 5.0,
            "batch1_over_floor": b1 and b1.get("over_floor", {}).get("ensemble_compiled"),
            "met": None if not (b1 and floor) else b1["over_floor"]["ensemble_compiled"] <= 5.0,
        },
        "runtime_s": time.perf_counter() - t_start,
    }


def main(argv: list[str] | None = None) -> int:
    default_out = str(common.RESULTS / "decode_gpu.json")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2-layer members, batch 1 and 2, 4 new tokens")
    p.add_argument("--out", default=None, help=f"JSON path (default {default_out}; --quick: a temp file)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: bf16 on GPU")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8 32")
    p.add_argument("--prompt-tokens", type=int, default=192, help="about a GSM8K prompt with its template")
    p.add_argument("--new-tokens", type=int, default=None, help="default 32")
    p.add_argument("--repeats", type=int, default=None, help="default 3")
    p.add_argument("--cache-len", type=int, default=768, help="static cache length bucket (GSM8K: 192 + 512 -> 768)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="override the detected memory bandwidth")
    p.add_argument("--eval-prompts", type=int, default=1319)
    p.add_argument("--eval-new-tokens", type=int, default=512)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device; for a smoke test use --quick --device cpu")
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 8, 32])
    args.new_tokens = args.new_tokens or (4 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.quick:
        args.prompt_tokens = min(args.prompt_tokens, 16)
    if args.out is None:
        args.out = str(Path(common.tempfile_dir()) / "salm_decode_gpu_quick.json") if args.quick else default_out
    res = run(args)
    path = write(args, res)
    for r in res["results"]:
        s = r["ms_per_step"]
        fl = r.get("floor_ms_per_step")
        ev = r["gsm8k_evaluation"]
        print(
            f"batch {r['batch_size']}: compiled {s['ensemble_compiled']:.2f} ms/step"
            + (f" = {r['over_floor']['ensemble_compiled']:.1f}x the floor ({fl:.2f} ms)" if fl else "")
            + f"; dynamic {s['ensemble_dynamic']:.2f}; Σ HF {r['members_sum_hf_ms_per_step']:.2f}, "
            f"Σ HF static+compile {r['members_sum_hf_compiled_ms_per_step']:.2f}; "
            f"GSM8K eval (ensemble + {r['n_members']} members) ≤ {ev['compiled_h']:.2f} h "
            f"(previous path {ev['previous_path_h']:.2f} h)"
        )
    for w in res["compile_warmups"]:
        print(f"warm-up: {', '.join(w['members'])} batch {w['batch']} cache {w['cache_len']}: {w['seconds']:.1f}s")
    common.log(f"wrote {path} in {res['runtime_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
