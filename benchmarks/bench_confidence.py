"""What the router statistics cost a routed decode step: ``confidence`` and ``aware`` routers against ``seed`` heads.

Three members with the real Qwen2.5-0.5B architecture (random weights, fp32, CPU; ``--quick``: 2 layers),
batch 1, greedy, exactly ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt. Three ensembles share
the very same members and differ only in the router, so the difference is the statistics
(:func:`salm.confidence.confidence_stats` over 3 x 151936 logits), for ``aware`` also the members' history
(one log-sum-exp per member per step, and at prefill each member's log-prob of every prompt token), plus the
heads' extra input.

Two measurements, both in one run:

* end to end: per repeat (order rotating) the time of a whole generation with each router; the
  headline is the median over repeats of router_time / seed_time - 1;
* isolated: the median time of the extra work alone (statistics [+ history] + the wider heads minus the seed
  heads) on one step's logits, over the median time of a seed decode step -- far less noisy on a shared
  machine, where two whole generations differ by more than 3 % from run to run; for ``aware`` also the
  prefill's extra work (the prompt tokens' log-probs through every member's LM head), once per generation.

    python benchmarks/bench_confidence.py            # writes benchmarks/results/confidence_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 0.03


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2-layer members (smoke run)")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); recorded")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or str(Path(__file__).parent / "results" / f"confidence_cpu{'_quick' if args.quick else ''}.json")

    from salm.confidence import History, confidence_stats
    from salm.ensemble import MultiModelWithScalarHeads
    from salm.generation import generate
    from salm.members import ModelInfo

    tok = common.bench_tokenizer()
    cfg = common.qwen_config("qwen2.5-0.5b", tok, 2 if args.quick else None)
    members = [common.build_random_member(cfg, seed=1000 + i) for i in range(args.members)]
    infos = [ModelInfo(f"m{i}", f"random 0.5b #{i}", f"random://0.5b/{i}") for i in range(args.members)]
    ens = {}
    routers = ("seed", "confidence", "aware")
    for router in routers:
        torch.manual_seed(0)
        e = MultiModelWithScalarHeads(infos, device="cpu", dtype=torch.float32, members=members, tokenizer=tok,
                                      router=router)  # fmt: skip
        e.eos_token_ids = set()  # exactly new_tokens tokens
        ens[router] = e.eval()
    texts, _ = common.fixed_length_prompts(tok, 1, args.prompt_tokens)

    def run(router: str) -> float:
        t0 = time.perf_counter()
        outs = generate(ens[router], texts, max_new_tokens=args.new_tokens, temperature=0.0, return_outputs=True)
        assert len(outs[0].token_ids) == args.new_tokens
        return time.perf_counter() - t0

    for router in routers:  # warm up
        run(router)
    times: dict[str, list[float]] = {r: [] for r in routers}
    for r in range(args.repeats):
        for router in routers[r % 3 :] + routers[: r % 3]:
            times[router].append(run(router))
            common.log(f"repeat {r}: {router} {times[router][-1]:.2f}s")
    per_repeat = {k: [c / s - 1 for s, c in zip(times["seed"], times[k])] for k in routers[1:]}

    # Isolated: the extra work on one decode step's inputs.
    V = cfg.vocab_size
    logits = torch.randn(1, args.members, V) * 3
    hidden = [torch.randn(1, cfg.hidden_size) for _ in members]

    def extra() -> None:
        with torch.no_grad():
            ens["confidence"].router_logits(hidden, confidence_stats(logits))

    history = History(1, args.members)
    token = torch.zeros(1, dtype=torch.long)

    def extra_aware() -> None:
        with torch.no_grad():
            history.observe(logits, token)
            ens["aware"].router_logits(hidden, ens["aware"].confidence_features(logits, history.features()))

    ids = tok(texts, return_tensors="pt")["input_ids"]
    prompt_hidden = [torch.randn(1, ids.shape[1], cfg.hidden_size) for _ in members]

    def prefill_aware() -> None:  # each member's log-prob of every prompt token, and the replay
        read = [ens["aware"].token_logprobs(i, h, None, ids) for i, h in enumerate(prompt_hidden)]
        History(1, args.members).replay(torch.stack(read, -1), torch.ones_like(ids, dtype=torch.bool))

    def base() -> None:
        with torch.no_grad():
            ens["seed"].router_logits(hidden)

    def med(fn, n: int = 200) -> float:
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    med(extra, 20), med(extra_aware, 20)
    base_s = med(base)
    extra_s = med(extra) - base_s
    aware_s = med(extra_aware) - base_s
    prefill_s = med(prefill_aware, 10)
    seed_total = statistics.median(times["seed"])
    step_s = seed_total / args.new_tokens  # prefill included: an upper bound on a step
    result = {
        "benchmark": "confidence statistics overhead",
        "quick": args.quick,
        "environment": common.environment("cpu"),
        "setup": {
            "architecture": "qwen2.5-0.5b",
            "layers": cfg.num_hidden_layers,
            "vocab_size": V,
            "members": args.members,
            "batch_size": 1,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
        },  # fmt: skip
        "end_to_end": {
            **{f"{k}_s": times[k] for k in routers},
            "overhead_per_repeat": per_repeat,
            "overhead_median": {k: statistics.median(v) for k, v in per_repeat.items()},
        },
        "isolated": {
            "seed_step_s": step_s,
            "confidence": {"extra_work_per_step_s": extra_s, "overhead": extra_s / step_s},
            "aware": {
                "extra_work_per_step_s": aware_s,
                "overhead": aware_s / step_s,
                "prefill_extra_s": prefill_s,
                "prefill_share_of_seed_generation": prefill_s / seed_total,
            },
        },
        "target": TARGET,
        "met": max(extra_s, aware_s) / step_s <= TARGET,
    }
    common.write_json(out, result)
    for k, x in (("confidence", extra_s), ("aware", aware_s)):
        print(
            f"{k}: end to end {100 * result['end_to_end']['overhead_median'][k]:+.1f}% (median of {args.repeats}); "
            f"isolated: {1e3 * x:.2f} ms per step over a {1e3 * step_s:.1f} ms step = +{100 * x / step_s:.2f}%"
        )
    print(f"aware prefill: {1e3 * prefill_s:.1f} ms once = {100 * prefill_s / seed_total:.2f}% of a seed generation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
