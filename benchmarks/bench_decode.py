"""Decode speed per token: the compiled static-cache step vs today's dynamic path vs the members' own ``generate``.

Three members of one architecture (random weights), argmax routing, greedy, EOS ignored. Per batch size we
time, interleaved over repeats (order rotated), each job at ``--new-tokens`` and at 1 token; the decode time
per step is ``(T(new) - T(1)) / (new - 1)`` (the prefill cancels out, and so does the compiled path's eager
prefill). Jobs:

- ``ensemble_dynamic``: ``generate`` as it was (growing ``DynamicCache`` per member);
- ``ensemble_compiled``: ``generate(compile=True)`` (static caches, whole step compiled);
- ``member{i}_hf``: member i's own Hugging Face ``generate`` (default dynamic cache);
- ``member{i}_hf_compiled``: the same with ``cache_implementation="static"`` and HF's ``compile_config``
  (its forward compiled for decoding, HF's own recipe);
- ``ensemble_member0``: routing ``member:m0`` (only that member runs), against ``member0_hf``.

Warm-ups (compilation per shape bucket, for us and for Hugging Face) run before the timed repeats and are
reported. The headline: compiled ensemble ÷ Σ over members of each member's best HF configuration.

    python benchmarks/bench_decode.py                 # CPU, Qwen2.5-0.5B arch fp32 -> results/decode_cpu.json
    python benchmarks/bench_decode.py --quick         # smoke: 2-layer members
    python benchmarks/bench_decode_gpu.py             # the GPU variant (Qwen2.5-1.5B arch bf16, bandwidth floor)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_generation  # noqa: E402
import common  # noqa: E402

TARGET_COMPILED_OVER_BEST_HF = 1.0


def ensemble_job(ens: Any, texts: list[str], new_tokens: int, **kw: Any):
    from salm.generation import generate

    def fn() -> Any:
        outs = generate(ens, texts, max_new_tokens=new_tokens, temperature=0.0, return_outputs=True, **kw)
        assert all(len(o.token_ids) == new_tokens for o in outs), [len(o.token_ids) for o in outs]
        return outs

    return fn


def hf_job(model: Any, ids: torch.Tensor, new_tokens: int, pad_id: int, compiled: bool):
    """A member's own ``generate``; ``compiled``: static cache + HF's compile of the decoding forward."""
    from transformers import CompileConfig

    mask = torch.ones_like(ids)
    extra: dict[str, Any] = {}
    if compiled:
        cuda = ids.device.type == "cuda"
        # HF compiles only on accelerators unless told otherwise; on CPU "reduce-overhead" (CUDA graphs) is moot.
        cfg = CompileConfig(mode="reduce-overhead" if cuda else "default")
        cfg._compile_all_devices = True
        extra = dict(cache_implementation="static", compile_config=cfg)

    def fn() -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=pad_id, **extra,
            )  # fmt: skip
        assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
        return out

    return fn


def build_jobs(tok: Any, members: list[Any], ens: Any, bs: int, prompt_tokens: int, new_tokens: int, device: str):
    from salm.generation import encode_prompts

    texts, ids = common.fixed_length_prompts(tok, bs, prompt_tokens, seed=bs)
    assert encode_prompts(ens, texts) == ids  # our path reads exactly the ids Hugging Face reads
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    jobs: dict[str, Any] = {}
    for n, suffix in ((new_tokens, ""), (1, "@1")):
        jobs["ensemble_dynamic" + suffix] = ensemble_job(ens, texts, n)
        jobs["ensemble_compiled" + suffix] = ensemble_job(ens, texts, n, compile=True)
        jobs["ensemble_member0" + suffix] = ensemble_job(ens, texts, n, routing="member:m0")
        for i, m in enumerate(members):
            jobs[f"member{i}_hf" + suffix] = hf_job(m, ids_t, n, tok.pad_token_id, compiled=False)
            jobs[f"member{i}_hf_compiled" + suffix] = hf_job(m, ids_t, n, tok.pad_token_id, compiled=True)
    return jobs


def warm_up(jobs: dict[str, Any], device: str) -> dict[str, float]:
    """One run of every job (compilation, cache allocation); seconds each, as the cost paid once per bucket."""
    out = {}
    for name, fn in jobs.items():
        if "@1" in name:
            continue
        dt, _ = common.timed(fn, device)
        out[name] = dt
        common.log(f"  warm-up {name}: {dt:.1f}s")
    return out


def per_step(times: dict[str, list[float]], job: str, new_tokens: int) -> list[float]:
    """Decode seconds per step, per repeat."""
    return [(a - b) / (new_tokens - 1) for a, b in zip(times[job], times[job + "@1"])]


def measure(args: argparse.Namespace, device: str, dtype: torch.dtype, arch: str, layers: int | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    tok, members, ensembles = bench_generation.build(arch, layers, args.members, dtype, device)
    ens = ensembles[args.members]
    jobs, warm, times, contention = {}, {}, {}, []
    for bs in args.batch_sizes:
        common.log(f"batch {bs}: warm-up (compiles for this shape)")
        jobs[bs] = build_jobs(tok, members, ens, bs, args.prompt_tokens, args.new_tokens, device)
        warm[bs] = warm_up(jobs[bs], device)
        times[bs] = {k: [] for k in jobs[bs]}
    reps = {bs: args.repeats if bs == 1 else args.batched_repeats for bs in args.batch_sizes}
    for r in range(max(reps.values())):
        rec = common.run_repeat(r, args.batch_sizes, reps, jobs, times, device, args.wait_quiet)
        contention.append(rec)
        others = rec["cpu_cores_used_by_other_processes"]
        common.log(f"repeat {r + 1} done in {rec['wall_s']:.0f}s (other processes: {others} cores)")
        common.write_json(
            args.out, summarise(args, device, dtype, arch, members, ensembles, times, warm, contention, t_start)
        )
    return summarise(args, device, dtype, arch, members, ensembles, times, warm, contention, t_start)


def summarise(
    args: argparse.Namespace,
    device: str,
    dtype: torch.dtype,
    arch: str,
    members: list[Any],
    ensembles: dict[int, Any],
    times: dict[int, dict[str, list[float]]],
    warm: dict[int, dict[str, float]],
    contention: list[dict[str, Any]],
    t_start: float,
) -> dict[str, Any]:
    """The JSON for the repeats done so far (written after every repeat: a run cut short keeps its numbers)."""
    from salm.fast_decode import warmup_report

    n_members = len(members)
    rows = []
    for bs in args.batch_sizes:
        t, new = times[bs], args.new_tokens
        step = {k: per_step(t, k, new) for k in t if "@" not in k}
        n_rep = len(t["ensemble_compiled"])
        if not n_rep:
            continue
        hf_sum = [sum(step[f"member{i}_hf"][r] for i in range(n_members)) for r in range(n_rep)]
        hf_c_sum = [sum(step[f"member{i}_hf_compiled"][r] for i in range(n_members)) for r in range(n_rep)]
        best = [
            sum(min(step[f"member{i}_hf"][r], step[f"member{i}_hf_compiled"][r]) for i in range(n_members))
            for r in range(n_rep)
        ]
        comp, dyn = step["ensemble_compiled"], step["ensemble_dynamic"]
        rows.append(
            {
                "batch_size": bs,
                "n_members": n_members,
                "repeats": n_rep,
                "decode_s_per_step": {k: common.summary(v) for k, v in step.items()},
                "members_hf_sum_s_per_step": common.summary(hf_sum),
                "members_hf_compiled_sum_s_per_step": common.summary(hf_c_sum),
                "members_best_hf_sum_s_per_step": common.summary(best),
                "ratio_compiled_over_best_hf_sum": common.summary([a / b for a, b in zip(comp, best)]),
                "ratio_dynamic_over_best_hf_sum": common.summary([a / b for a, b in zip(dyn, best)]),
                "ratio_compiled_over_dynamic": common.summary([a / b for a, b in zip(comp, dyn)]),
                "ratio_member_routing_over_member0_hf": common.summary(
                    [a / b for a, b in zip(step["ensemble_member0"], step["member0_hf"])]
                ),
                "ratio_member_routing_over_dynamic": common.summary(
                    [a / b for a, b in zip(step["ensemble_member0"], dyn)]
                ),
                "run_time_s": {k: common.summary(v) for k, v in t.items()},
                "warmup_s": warm[bs],
            }
        )
    ratios = {r["batch_size"]: r["ratio_compiled_over_best_hf_sum"]["median"] for r in rows}
    cfg = members[0].config
    ens = ensembles[args.members]
    return {
        "benchmark": "decode",
        "quick": bool(args.quick),
        "environment": common.environment(device),
        "setup": {
            "architecture": arch,
            "layers": cfg.num_hidden_layers,
            "dtype": str(dtype).replace("torch.", ""),
            "device": device,
            "weight_bytes_per_member": common.weight_bytes(members[0]),
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats_batch1": args.repeats,
            "repeats_batched": args.batched_repeats,
            "routing": "argmax (untrained random heads), greedy; ensemble_member0: member:m0",
            "per_step": "(T(new_tokens) - T(1 token)) / (new_tokens - 1), per repeat, then the median",
            "eos": "ignored on both sides (see bench_generation.py)",
            "hf_compiled": "cache_implementation='static' + CompileConfig(mode='default' on CPU, "
            "'reduce-overhead' on CUDA), HF compiles its decoding forward",
            "statistic": "median over interleaved repeats; ratios are per repeat, then the median",
            "wait_quiet_s": args.wait_quiet,
        },
        "compile_warmups": [w.__dict__ for w in warmup_report(ens)],
        "results": rows,
        "repeats_done": len(contention),
        "contention": contention,
        "targets": {
            "compiled_over_best_hf_sum_max": TARGET_COMPILED_OVER_BEST_HF,
            "compiled_over_best_hf_sum": ratios,
            "met": {bs: v <= TARGET_COMPILED_OVER_BEST_HF for bs, v in ratios.items()},
        },
        "load_average_at_end": common.load_average(),
        "runtime_s": time.perf_counter() - t_start,
    }


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run: 2-layer members, 8 new tokens, 1 repeat")
    p.add_argument("--out", default=None, help=f"JSON path (default {default_out}; --quick: a temp file)")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=None, help="default 32 (--quick: 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats at batch 1 (default 3; --quick 1)")
    p.add_argument("--batched-repeats", type=int, default=None, help="timed repeats at batch > 1 (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many s per repeat for quiet CPUs")
    return p


def finish_args(args: argparse.Namespace, default_out: str, quick_out: str) -> None:
    if args.new_tokens is None:
        args.new_tokens = 8 if args.quick else 32
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.batched_repeats is None:
        args.batched_repeats = 1 if args.quick else 2
    if args.out is None:
        args.out = str(Path(common.tempfile_dir()) / quick_out) if args.quick else default_out


def print_summary(result: dict[str, Any]) -> None:
    for r in result["results"]:
        s = {k: v["median"] * 1e3 for k, v in r["decode_s_per_step"].items()}
        n = r["n_members"]
        print(
            f"batch {r['batch_size']} N={n}: ms/step compiled {s['ensemble_compiled']:.1f}, "
            f"dynamic {s['ensemble_dynamic']:.1f}, Σ HF {1e3 * r['members_hf_sum_s_per_step']['median']:.1f}, "
            f"Σ HF static+compile {1e3 * r['members_hf_compiled_sum_s_per_step']['median']:.1f}, "
            f"Σ best HF {1e3 * r['members_best_hf_sum_s_per_step']['median']:.1f}; "
            f"compiled / Σ best HF {r['ratio_compiled_over_best_hf_sum']['median']:.3f}; "
            f"member:m0 routing {s['ensemble_member0']:.1f} vs member0 HF {s['member0_hf']:.1f}"
        )
    for w in result["compile_warmups"]:
        print(f"warm-up: {', '.join(w['members'])} batch {w['batch']} cache {w['cache_len']}: {w['seconds']:.1f}s")


def main(argv: list[str] | None = None) -> int:
    default_out = str(common.RESULTS / "decode_cpu.json")
    args = parser(__doc__.splitlines()[0], default_out).parse_args(argv)
    finish_args(args, default_out, "salm_decode_cpu_quick.json")
    torch.set_num_threads(args.threads or common.core_count())
    result = measure(args, "cpu", torch.float32, "qwen2.5-0.5b", 2 if args.quick else None)
    path = common.write_json(args.out, result)
    print_summary(result)
    common.log(f"wrote {path} in {result['runtime_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
