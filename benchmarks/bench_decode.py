"""CPU decode speed per step: batch sizes x dtypes x kernels (default), or saLM vs the members' own HF generate.

**Default: the batch sweep** (``results/decode_cpu_batches.json``). Two members of one architecture (random
weights, Qwen2.5-0.5B by default), argmax routing, greedy, EOS ignored, at batch 1, 2, 3, 4 and 8, for each
configuration (dtype x kernels): float32 and -- where the CPU multiplies it natively (:mod:`salm.cpu`) --
bfloat16, each with saLM's packed oneDNN linears (``packed``, what members load with) and with PyTorch's
own kernels (``plain``: MKL sgemm in fp32, what saLM used before). The default configuration (``auto``
dtype, packed) also runs the static-cache and the compiled paths. Per round (configurations and batch
sizes in a rotated order; members are built afresh per configuration, so only one configuration is in
memory) each job is timed at ``--new-tokens`` and at 1 token: per decode step ``(T(new) - T(1)) / (new - 1)``
(the prefill cancels out). Ratios (batch b over batch 1, default over float32) are formed inside a round,
then the median over rounds. Targets: the default dtype's step at every batch <= 8 within 1.3 x batch 1's;
on a bf16-capable CPU the default batch-1 step <= 0.7 x float32's.

**``--versus-hf``: against Hugging Face** (``results/decode_cpu.json``). Three members (random weights),
fp32, per batch size, interleaved over repeats, each job at ``--new-tokens`` and at 1 token:

- ``ensemble_dynamic``: ``generate`` as it was (growing ``DynamicCache`` per member);
- ``ensemble_compiled``: ``generate(compile=True)`` (static caches, whole step compiled);
- ``member{i}_hf``: member i's own Hugging Face ``generate`` (default dynamic cache);
- ``member{i}_hf_compiled``: the same with ``cache_implementation="static"`` and HF's ``compile_config``
  (its forward compiled for decoding, HF's own recipe);
- ``ensemble_member0``: routing ``member:m0`` (only that member runs), against ``member0_hf``.

Warm-ups (compilation per shape bucket, for us and for Hugging Face) run before the timed repeats and are
reported. The headline: compiled ensemble ÷ Σ over members of each member's best HF configuration.

    python benchmarks/bench_decode.py                 # the batch sweep -> results/decode_cpu_batches.json
    python benchmarks/bench_decode.py --quick         # smoke: 2-layer members, one round
    python benchmarks/bench_decode.py --versus-hf     # CPU, Qwen2.5-0.5B arch fp32 -> results/decode_cpu.json
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


# ---------------------------------------------------------------------------------------------- the batch sweep
SWEEP_BATCH_SIZES = [1, 2, 3, 4, 8]
TARGET_BATCH_OVER_B1 = 1.3  # the default dtype's step at any batch <= 8, over its batch-1 step
TARGET_BF16_OVER_FP32 = 0.7  # on a bf16-capable CPU: the default batch-1 step over float32's (packed)
PATHS = {"dynamic": {}, "static": {"cache_implementation": "static"}, "compiled": {"compile": True}}


def sweep_configs() -> list[dict[str, Any]]:
    """float32 and (where native) bfloat16, each packed (saLM's) and plain (PyTorch's kernels); the default
    configuration (``auto`` dtype, packed) also runs the static and the compiled paths."""
    from salm.cpu import auto_dtype, native_bf16

    auto = str(auto_dtype()).replace("torch.", "")
    dtypes = ["float32"] + (["bfloat16"] if native_bf16() else [])
    configs = []
    for d in dtypes:
        for k in ("packed", "plain"):
            default = d == auto and k == "packed"
            paths = list(PATHS) if default else ["dynamic"]
            configs.append({"name": f"{d}_{k}", "dtype": d, "kernels": k, "default": default, "paths": paths})
    return configs


def build_config(tok: Any, cfg: Any, n_members: int, config: dict[str, Any]) -> Any:
    """``n_members`` random members in the configuration's dtype and kernels, as one ensemble (EOS ignored)."""
    from salm.cpu import pack_linear_weights
    from salm.ensemble import MultiModelWithScalarHeads
    from salm.members import ModelInfo

    dtype = getattr(torch, config["dtype"])
    members = [common.build_random_member(cfg, seed=1000 + i, dtype=dtype) for i in range(n_members)]
    if config["kernels"] == "packed":
        for m in members:
            pack_linear_weights(m)
    infos = [ModelInfo(f"m{i}", f"random #{i}", f"random://{i}") for i in range(n_members)]
    torch.manual_seed(0)
    ens = MultiModelWithScalarHeads(infos, device="cpu", dtype=dtype, members=members, tokenizer=tok).eval()
    ens.eos_token_ids = set()  # exactly max_new_tokens tokens (random weights emit EOS at random)
    return ens


def sweep_round(args: argparse.Namespace, r: int, tok: Any, cfg: Any, configs: list[dict[str, Any]], times: dict,
                warm: dict) -> None:  # fmt: skip
    """One round: every configuration (rotated order), its members built afresh; per batch size (rotated) and
    path, T(new tokens) and T(1 token) back to back (their order alternating between rounds)."""
    for config in configs[r % len(configs) :] + configs[: r % len(configs)]:
        t0 = time.perf_counter()
        ens = build_config(tok, cfg, args.members, config)
        common.log(f"round {r + 1}: {config['name']} members built in {time.perf_counter() - t0:.0f}s")
        sizes = args.batch_sizes[r % len(args.batch_sizes) :] + args.batch_sizes[: r % len(args.batch_sizes)]
        for bs in sizes:
            texts, _ = common.fixed_length_prompts(tok, bs, args.prompt_tokens, seed=bs)
            for path in config["paths"]:
                jobs = {n: ensemble_job(ens, texts, n, **PATHS[path]) for n in (args.new_tokens, 1)}
                dt, _ = common.timed(ensemble_job(ens, texts, 2, **PATHS[path]))  # compiles a new bucket
                warm.setdefault(config["name"], {}).setdefault(path, {}).setdefault(bs, []).append(dt)
                order = (args.new_tokens, 1) if r % 2 == 0 else (1, args.new_tokens)
                got = {n: common.timed(jobs[n])[0] for n in order}
                times[config["name"]][path][bs].append((got[args.new_tokens], got[1]))
        del ens


def sweep_summary(args: argparse.Namespace, configs: list[dict[str, Any]], times: dict, warm: dict,
                  rounds: list[dict[str, Any]], t_start: float) -> dict[str, Any]:  # fmt: skip
    """Per configuration, path and batch size: ms per step, tokens/s and the ratio to batch 1 (per round, then
    the median); the default configuration against float32; the targets."""
    from salm.cpu import auto_dtype

    def step(name: str, path: str, bs: int) -> list[float]:
        return [(a - b) / (args.new_tokens - 1) for a, b in times[name][path][bs]]

    results: dict[str, Any] = {}
    for c in configs:
        for path in c["paths"]:
            rows = []
            for bs in args.batch_sizes:
                s, s1 = step(c["name"], path, bs), step(c["name"], path, args.batch_sizes[0])
                if not s:
                    continue
                rows.append({
                    "batch_size": bs,
                    "ms_per_step": common.summary([1e3 * x for x in s]),
                    "tokens_per_s": common.summary([bs / x for x in s]),
                    "over_batch1": common.summary([a / b for a, b in zip(s, s1)]),
                    "warmup_s": warm.get(c["name"], {}).get(path, {}).get(bs),
                })  # fmt: skip
            results[f"{c['name']}/{path}"] = {**{k: c[k] for k in ("dtype", "kernels", "default")}, "path": path,
                                              "rows": rows}  # fmt: skip
    default = next(c for c in configs if c["default"])
    b1 = args.batch_sizes[0]
    cross: dict[str, Any] = {}
    for other in ("float32_packed", "float32_plain"):
        if other != default["name"] and times[other]["dynamic"][b1]:
            pairs = zip(step(default["name"], "dynamic", b1), step(other, "dynamic", b1))
            cross[f"default_batch1_over_{other}"] = common.summary([a / b for a, b in pairs])
    for d in ("float32", "bfloat16"):
        if f"{d}_plain" in times and times[f"{d}_plain"]["dynamic"][b1]:
            pairs = {bs: zip(step(f"{d}_packed", "dynamic", bs), step(f"{d}_plain", "dynamic", bs))
                     for bs in args.batch_sizes if times[f"{d}_plain"]["dynamic"][bs]}  # fmt: skip
            cross[f"{d}_packed_over_plain"] = {bs: common.summary([a / b for a, b in p]) for bs, p in pairs.items()}
    worst = {
        path: max((r["over_batch1"]["median"] for r in results[f"{default['name']}/{path}"]["rows"]), default=None)
        for path in default["paths"]
    }
    bf16_ratio = cross.get("default_batch1_over_float32_packed", {}).get("median")
    return {
        "benchmark": "decode_batches",
        "quick": bool(args.quick),
        "environment": common.environment("cpu"),
        "setup": {
            "architecture": args.arch,
            "layers": 2 if args.quick else None,
            "members": args.members,
            "default_dtype": str(auto_dtype()).replace("torch.", ""),
            "default_config": default["name"],
            "configs": configs,
            "batch_sizes": args.batch_sizes,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "routing": "argmax (untrained random heads), greedy, EOS ignored",
            "per_step": "(T(new_tokens) - T(1 token)) / (new_tokens - 1) per round; ratios per round, then the median",
            "kernels": "packed: salm.cpu.pack_linear_weights (oneDNN, blocked weights; how salm loads members); "
            "plain: torch.nn.Linear as loaded (fp32: MKL sgemm)",
        },  # fmt: skip
        "results": results,
        "cross": cross,
        "rounds_done": rounds,
        "targets": {
            "default_over_batch1_max": TARGET_BATCH_OVER_B1,
            "default_over_batch1_worst": worst,
            "default_batch1_over_float32_max": TARGET_BF16_OVER_FP32 if bf16_ratio is not None else None,
            "default_batch1_over_float32": bf16_ratio,
            "met": {
                **{f"batch_scaling_{p}": v is not None and v <= TARGET_BATCH_OVER_B1 for p, v in worst.items()},
                **({"bf16_over_fp32": bf16_ratio <= TARGET_BF16_OVER_FP32} if bf16_ratio is not None else {}),
            },
        },
        "load_average_at_end": common.load_average(),
        "runtime_s": time.perf_counter() - t_start,
    }


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    tok = common.bench_tokenizer()
    cfg = common.qwen_config(args.arch, tok, 2 if args.quick else None)
    configs = sweep_configs()
    times = {c["name"]: {p: {bs: [] for bs in args.batch_sizes} for p in c["paths"]} for c in configs}
    warm: dict = {}
    rounds: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for r in range(args.rounds):
        waited = common.wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else 0.0
        window, load0, t0 = common.Contention(), common.load_average(), time.perf_counter()
        sweep_round(args, r, tok, cfg, configs, times, warm)
        others = window.cores_used_by_others()
        rounds.append({
            "round": r + 1, "wall_s": round(time.perf_counter() - t0, 1), "waited_for_quiet_s": round(waited, 1),
            "load_average_start": load0, "load_average_end": common.load_average(),
            "cpu_cores_used_by_other_processes": None if others is None else round(others, 3),
        })  # fmt: skip
        result = sweep_summary(args, configs, times, warm, rounds, t_start)
        common.write_json(args.out, result)
        common.log(f"round {r + 1} done in {rounds[-1]['wall_s']:.0f}s (other processes: {others} cores)")
    return result


def print_sweep(result: dict[str, Any]) -> None:
    cpu = result["environment"]["cpu_info"]
    print(f"{cpu['model']} ({', '.join(cpu['flags'])}); default dtype {result['setup']['default_dtype']}")
    for key, res in result["results"].items():
        cells = [f"b{r['batch_size']} {r['ms_per_step']['median']:.0f} ms ({r['over_batch1']['median']:.2f}x)"
                 for r in res["rows"]]  # fmt: skip
        print(f"{key:26s}{' *' if res['default'] else '  '} " + ", ".join(cells))
    for k, v in result["cross"].items():
        if "median" in v:
            print(f"{k}: {v['median']:.3f}")
        else:
            print(f"{k}: " + ", ".join(f"b{bs} {x['median']:.2f}" for bs, x in v.items()))
    print(f"targets met: {result['targets']['met']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--versus-hf" in argv:
        return main_versus_hf([a for a in argv if a != "--versus-hf"])
    default_out = str(common.RESULTS / "decode_cpu_batches.json")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2-layer members, 4 new tokens, 1 round")
    p.add_argument("--out", default=None, help=f"JSON path (default {default_out}; --quick: a temp file)")
    p.add_argument("--arch", default="qwen2.5-0.5b", choices=sorted(common.ARCHS))
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=SWEEP_BATCH_SIZES)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None, help="default 13 (--quick: 4)")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many s per round for quiet CPUs")
    p.add_argument("--versus-hf", action="store_true", help="the comparison with HF generate instead (see above)")
    args = p.parse_args(argv)
    args.new_tokens = args.new_tokens or (4 if args.quick else 13)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.out = args.out or (
        str(Path(common.tempfile_dir()) / "salm_decode_batches_quick.json") if args.quick else default_out
    )
    torch.set_num_threads(args.threads or common.core_count())
    result = run_sweep(args)
    print_sweep(result)
    common.log(f"wrote {args.out} in {result['runtime_s']:.0f}s")
    return 0


def main_versus_hf(argv: list[str] | None = None) -> int:
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
