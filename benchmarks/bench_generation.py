"""Routed generation speed against the members' own Hugging Face ``generate`` and the seed's decoding loop.

Members have the real Qwen2.5-0.5B architecture (``--quick``: 2 layers) with random weights, fp32 on the
CPU. Every run generates exactly ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt: our path ignores
EOS, Hugging Face gets ``min_new_tokens=max_new_tokens``, both read the same prompt ids. Per repeat (order
rotated between repeats) we time each ensemble size and each member's own ``generate``; the headline figure
is the median over repeats of ensemble_time / sum(member_times).

    python benchmarks/bench_generation.py            # writes benchmarks/results/generation_cpu.json
    python benchmarks/bench_generation.py --quick    # smoke run, 2-layer members
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET_RATIO_B1 = 1.05
TARGET_BATCH_SPEEDUP = 3.0


# ---------------------------------------------------------------------------------------------- the seed
@torch.no_grad()
def seed_style_generate(
    members: list[Any], heads: list[Any], tokenizer: Any, prompt: str, max_new_tokens: int, vocab_size: int
) -> list[int]:
    """The seed's decoding loop, compactly (batch 1, greedy, EOS ignored, no KV cache).

    Every step re-tokenises the whole text, runs every member over the full sequence with
    ``output_hidden_states=True`` (so full-vocabulary logits at every position and every layer's
    activations), scores each position with that member's head in a Python loop, routes the last
    position to the best-scoring member and appends its greedy token to the text.
    """
    device = next(members[0].parameters()).device
    text = prompt
    new_ids: list[int] = []
    for _ in range(max_new_tokens):
        enc = tokenizer(text, return_tensors="pt").to(device)
        scores, last_logits = [], []
        for model, head in zip(members, heads):
            out = model(**enc, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            per_position = [head(hidden[:, t]) for t in range(hidden.shape[1])]
            scores.append(torch.stack(per_position, dim=1))  # [1, L]
            last_logits.append(out.logits[0, -1, :vocab_size].float())
        routing = torch.softmax(torch.stack(scores, dim=-1).float(), dim=-1)  # [1, L, M]
        best = int(routing[0, -1].argmax())
        token = int(last_logits[best].argmax())
        new_ids.append(token)
        text += tokenizer.decode([token])
    return new_ids


# ---------------------------------------------------------------------------------------------- setup
def build(
    arch: str, layers: int | None, n_members: int, dtype: torch.dtype, device: str
) -> tuple[Any, list[Any], dict[int, Any]]:
    """Tokenizer, ``n_members`` random members and one ensemble per size 2..n_members (sharing the members)."""
    from salm.ensemble import MultiModelWithScalarHeads
    from salm.members import ModelInfo

    tok = common.bench_tokenizer()
    cfg = common.qwen_config(arch, tok, layers)
    members = []
    for i in range(n_members):
        t0 = time.perf_counter()
        members.append(common.build_random_member(cfg, seed=1000 + i, dtype=dtype, device=device))
        common.log(f"member {i}: {arch} x{cfg.num_hidden_layers} layers built in {time.perf_counter() - t0:.1f}s")
    ensembles = {}
    for n in range(2, n_members + 1):
        infos = [ModelInfo(f"m{i}", f"random {arch} #{i}", f"random://{arch}/{i}") for i in range(n)]
        torch.manual_seed(n)
        ens = MultiModelWithScalarHeads(infos, device=device, dtype=dtype, members=members[:n], tokenizer=tok)
        ens.eos_token_ids = set()  # force exactly max_new_tokens tokens (random weights emit EOS at random)
        ensembles[n] = ens.eval()
    for m in members:
        # No EOS for Hugging Face either: with an EOS id, min_new_tokens adds two full-vocabulary logits
        # processors per step (torch.isin over 151936 ids) that an ordinary generate call does not pay.
        m.generation_config.eos_token_id = None
    return tok, members, ensembles


def ensemble_run(ens: Any, texts: list[str], new_tokens: int) -> Any:
    from salm.generation import generate

    def fn() -> list[Any]:
        outs = generate(ens, texts, max_new_tokens=new_tokens, temperature=0.0, routing="argmax", return_outputs=True)
        assert all(len(o.token_ids) == new_tokens for o in outs), [len(o.token_ids) for o in outs]
        return outs

    return fn


def member_run(model: Any, ids: torch.Tensor, new_tokens: int, pad_id: int) -> Any:
    mask = torch.ones_like(ids)

    def fn() -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad_id,
            )
        assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
        return out

    return fn


# ---------------------------------------------------------------------------------------------- measure
def measure(
    tok: Any,
    members: list[Any],
    ensembles: dict[int, Any],
    batch_sizes: list[int],
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    device: str,
    split_prefill: bool,
    batched_repeats: int | None = None,
    wait_quiet_s: float = 0.0,
) -> tuple[list[dict[str, Any]], dict[int, dict[str, list[float]]], list[dict[str, Any]]]:
    """Repeats of every job (each ensemble size, each member) at every batch size, interleaved.

    Each repeat runs all batch sizes, in an order rotated between repeats, so a burst of load from other
    processes hits ensemble and baseline alike and ratios are formed within one repeat.
    Returns (rows, raw times[batch][job], per-repeat contention records).
    """
    from salm.generation import encode_prompts

    reps = {bs: repeats if bs == 1 or batched_repeats is None else batched_repeats for bs in batch_sizes}
    jobs: dict[int, dict[str, Any]] = {}
    for bs in batch_sizes:
        texts, ids = common.fixed_length_prompts(tok, bs, prompt_tokens, seed=bs)
        for ens in ensembles.values():  # our path must read exactly the ids Hugging Face reads
            assert encode_prompts(ens, texts) == ids
        ids_t = torch.tensor(ids, dtype=torch.long, device=device)
        j: dict[str, Any] = {f"ensemble{n}": ensemble_run(e, texts, new_tokens) for n, e in ensembles.items()}
        j.update({f"member{i}": member_run(m, ids_t, new_tokens, tok.pad_token_id) for i, m in enumerate(members)})
        if split_prefill:  # prefill + one token: decode time per token = (T(new) - T(1)) / (new - 1)
            j.update({f"ensemble{n}@1": ensemble_run(e, texts, 1) for n, e in ensembles.items()})
            j.update({f"member{i}@1": member_run(m, ids_t, 1, tok.pad_token_id) for i, m in enumerate(members)})
        jobs[bs] = j
        common.log(f"batch {bs}: warm-up")
        ensemble_run(ensembles[max(ensembles)], texts, 2)()
        member_run(members[0], ids_t, 2, tok.pad_token_id)()
    times: dict[int, dict[str, list[float]]] = {bs: {k: [] for k in jobs[bs]} for bs in batch_sizes}
    contention = []
    for r in range(max(reps.values())):
        rec = common.run_repeat(r, batch_sizes, reps, jobs, times, device, wait_quiet_s)
        contention.append(rec)
        active, others = rec["batch_sizes"], rec["cpu_cores_used_by_other_processes"]
        common.log(
            f"repeat {r + 1}: "
            + "; ".join(
                f"b{bs} " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times[bs].items() if "@" not in k)
                for bs in active
            )
            + (f" (other processes used {others:.2f} cores)" if others is not None else "")
        )
    rows = []
    for bs in batch_sizes:
        t = times[bs]
        n_rep = reps[bs]
        for n in ensembles:
            ens_t = t[f"ensemble{n}"]
            sum_t = [sum(t[f"member{i}"][r] for i in range(n)) for r in range(n_rep)]
            ratios = [e / s for e, s in zip(ens_t, sum_t)]
            gen_tokens = bs * new_tokens
            row: dict[str, Any] = {
                "batch_size": bs,
                "n_members": n,
                "repeats": n_rep,
                "generated_tokens_per_run": gen_tokens,
                "ensemble_time_s": common.summary(ens_t),
                "ensemble_tokens_per_s": gen_tokens / common.median(ens_t),
                "members_sum_time_s": common.summary(sum_t),
                "members_sum_tokens_per_s": gen_tokens / common.median(sum_t),
                "member_time_s": {f"member{i}": common.summary(t[f"member{i}"]) for i in range(n)},
                "ratio_ensemble_over_members_sum": common.summary(ratios),
            }
            if split_prefill:
                steps = new_tokens - 1
                ens1 = t[f"ensemble{n}@1"]
                sum1 = [sum(t[f"member{i}@1"][r] for i in range(n)) for r in range(n_rep)]
                row["ensemble_prefill_s"] = common.summary(ens1)
                row["members_sum_prefill_s"] = common.summary(sum1)
                row["ensemble_decode_s_per_step"] = (common.median(ens_t) - common.median(ens1)) / steps
                row["members_sum_decode_s_per_step"] = (common.median(sum_t) - common.median(sum1)) / steps
            rows.append(row)
    return rows, times, contention


def measure_seed(
    tok: Any, members: list[Any], ensembles: dict[int, Any], n: int, prompt_tokens: int, new_tokens: int, device: str
) -> dict[str, Any]:
    """The seed's loop (batch 1) on the same prompt: one timed run after a one-token warm-up."""
    texts, _ = common.fixed_length_prompts(tok, 1, prompt_tokens, seed=1)
    ens = ensembles[n]
    heads = [ens.projection_heads[mid] for mid in ens.model_ids]
    args = (members[:n], heads, tok, texts[0])
    seed_style_generate(*args, 1, ens.vocab_size)
    common.log(f"seed-style loop: N={n}, {new_tokens} new tokens")
    dt, _ = common.timed(lambda: seed_style_generate(*args, new_tokens, ens.vocab_size), device)
    return {"n_members": n, "batch_size": 1, "new_tokens": new_tokens, "time_s": dt, "tokens_per_s": new_tokens / dt}


def run(args: argparse.Namespace, device: str, dtype: torch.dtype, arch: str, layers: int | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    n_max = max(args.members)
    tok, members, ensembles = build(arch, layers, n_max, dtype, device)
    ensembles = {n: e for n, e in ensembles.items() if n in args.members}
    rows, times, contention = measure(
        tok,
        members,
        ensembles,
        args.batch_sizes,
        args.prompt_tokens,
        args.new_tokens,
        args.repeats,
        device,
        args.split_prefill,
        args.batched_repeats,
        args.wait_quiet,
    )
    by = {(r["batch_size"], r["n_members"]): r for r in rows}
    scaling = []
    if 1 in args.batch_sizes:
        for bs in args.batch_sizes:
            if bs == 1:
                continue
            for n in ensembles:
                # per repeat (batch 1 and batch bs ran in the same repeat), then the median
                t1, tb = times[1][f"ensemble{n}"], times[bs][f"ensemble{n}"]
                per_rep = [bs * a / b for a, b in zip(t1, tb)]
                s = common.median(per_rep)
                scaling.append(
                    {
                        "n_members": n,
                        "batch_size": bs,
                        "tokens_per_s_batch1": by[(1, n)]["ensemble_tokens_per_s"],
                        "tokens_per_s": by[(bs, n)]["ensemble_tokens_per_s"],
                        "throughput_over_batch1": s,
                        "throughput_over_batch1_per_repeat": per_rep,
                        "ratio_of_median_throughputs": by[(bs, n)]["ensemble_tokens_per_s"]
                        / by[(1, n)]["ensemble_tokens_per_s"],
                        "target": TARGET_BATCH_SPEEDUP if bs == 8 else None,
                        "met": s >= TARGET_BATCH_SPEEDUP if bs == 8 else None,
                    }
                )
    seed = []
    for n in args.seed_members:
        if args.seed_new_tokens <= 0:
            break
        s = measure_seed(tok, members, ensembles, n, args.prompt_tokens, args.seed_new_tokens, device)
        if (1, n) in by:
            s["ensemble_tokens_per_s_batch1"] = by[(1, n)]["ensemble_tokens_per_s"]
            s["ensemble_speedup_over_seed"] = by[(1, n)]["ensemble_tokens_per_s"] / s["tokens_per_s"]
        seed.append(s)
    ratio_b1 = {n: by[(1, n)]["ratio_ensemble_over_members_sum"]["median"] for n in ensembles if (1, n) in by}
    cfg = members[0].config
    return {
        "benchmark": "generation",
        "quick": bool(args.quick),
        "environment": common.environment(device),
        "setup": {
            "architecture": arch,
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
            "tokenizer_vocab": len(tok),
            "dtype": str(dtype).replace("torch.", ""),
            "device": device,
            "weight_bytes_per_member": common.weight_bytes(members[0]),
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats_batch1": args.repeats,
            "repeats_batched": args.batched_repeats,
            "warmup": "one 2-token run of the largest ensemble and of member 0 per batch size",
            "routing": "argmax, greedy (temperature 0), untrained random heads",
            "eos": "ignored: ensemble eos_token_ids emptied; members' generation_config.eos_token_id = None "
            "(and min_new_tokens = max_new_tokens), so Hugging Face runs no logits processors",
            "baseline": "each member's own Hugging Face generate (KV cache, greedy), timed separately and summed",
            "statistic": "median over interleaved repeats; ratios are per repeat, then the median",
            "wait_quiet_s": args.wait_quiet,
        },
        "results": rows,
        "contention": contention,
        "batch_scaling": scaling,
        "seed_style": seed,
        "targets": {
            "ratio_batch1_max": TARGET_RATIO_B1,
            "ratio_batch1": ratio_b1,
            "ratio_batch1_met": all(v <= TARGET_RATIO_B1 for v in ratio_b1.values()) if ratio_b1 else None,
            "batch8_speedup_min": TARGET_BATCH_SPEEDUP,
            "batch8_speedup_met": all(s["met"] for s in scaling if s["met"] is not None) if scaling else None,
        },
        "load_average_at_end": common.load_average(),
        "runtime_s": time.perf_counter() - t_start,
    }


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run: 2-layer members, 16 new tokens, 1 repeat")
    p.add_argument("--out", default=None, help=f"JSON path (default {default_out}; --quick: a temp file)")
    p.add_argument("--members", type=int, nargs="+", default=[2, 3], help="ensemble sizes")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (--quick: 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats at batch 1 (default 3; --quick 1)")
    p.add_argument("--batched-repeats", type=int, default=None, help="timed repeats at batch > 1 (default 2)")
    p.add_argument("--seed-members", type=int, nargs="*", default=[2], help="ensemble sizes for the seed loop")
    p.add_argument("--seed-new-tokens", type=int, default=None, help="tokens for the seed loop (0 = skip)")
    p.add_argument("--split-prefill", action="store_true", help="also time prefill + 1 token (per-step decode time)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each repeat wait up to this many seconds for other processes to go idle (shared machines)",
    )
    return p


def finish_args(args: argparse.Namespace, default_out: str, quick_out: str) -> None:
    if args.new_tokens is None:
        args.new_tokens = 16 if args.quick else 64
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.batched_repeats is None:
        args.batched_repeats = args.repeats
    if args.seed_new_tokens is None:
        args.seed_new_tokens = 4 if args.quick else 16
    if args.out is None:
        args.out = str(Path(common.tempfile_dir()) / quick_out) if args.quick else default_out


def main(argv: list[str] | None = None) -> int:
    default_out = str(common.RESULTS / "generation_cpu.json")
    args = parser(__doc__.splitlines()[0], default_out).parse_args(argv)
    if args.batched_repeats is None and not args.quick:
        # 24-layer members on 2 CPU cores: one batch-8 repeat (N=2, N=3 and three members) takes ~160 s;
        # two batched repeats keep the whole script near ten minutes.
        args.batched_repeats = 2
    finish_args(args, default_out, "salm_generation_cpu_quick.json")
    torch.set_num_threads(args.threads or common.core_count())
    result = run(args, "cpu", torch.float32, "qwen2.5-0.5b", 2 if args.quick else None)
    path = common.write_json(args.out, result)
    print_summary(result)
    common.log(f"wrote {path} in {result['runtime_s']:.0f}s")
    return 0


def print_summary(result: dict[str, Any]) -> None:
    for r in result["results"]:
        print(
            f"batch {r['batch_size']} N={r['n_members']}: ensemble {r['ensemble_tokens_per_s']:.2f} tok/s, "
            f"members sequentially {r['members_sum_tokens_per_s']:.2f} tok/s, "
            f"ratio {r['ratio_ensemble_over_members_sum']['median']:.3f}"
        )
    for s in result["batch_scaling"]:
        print(f"N={s['n_members']}: batch {s['batch_size']} / batch 1 throughput {s['throughput_over_batch1']:.2f}x")
    for s in result["seed_style"]:
        extra = f", ensemble {s['ensemble_speedup_over_seed']:.1f}x faster" if "ensemble_speedup_over_seed" in s else ""
        print(f"seed loop N={s['n_members']}: {s['tokens_per_s']:.3f} tok/s ({s['new_tokens']} new tokens){extra}")


if __name__ == "__main__":
    sys.exit(main())
