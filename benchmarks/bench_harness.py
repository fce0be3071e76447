"""lm-evaluation-harness throughput: the ``salm`` model against lm-eval's own ``hf`` model, and ensemble cost.

On the quickstart's ``tiny`` members (built in a temporary folder, ~10 s), with lm-eval requests built once from
the offline tasks on the shared data (``../shared/data`` or ``$SALM_DATA_DIR``): ``medqa_4options_local``
(log-likelihood, 4 requests per question) and ``gsm8k_local`` (``generate_until``, greedy). Measured, at the
same batch size, in one process, repeats interleaved (median):

* requests/s of ``salm`` with ``routing=member:general`` vs ``hf`` on the ``general`` member's folder (``hf``
  both with its default one-token-continuation logits cache and with ``logits_cache=False``);
* the ensemble's (argmax routing) time ÷ the sum of its members' ``member:<id>`` times on the same requests
  (log-likelihood); for generation per generated token, because routing changes where each answer stops.

    python benchmarks/bench_harness.py            # writes benchmarks/results/harness.json
    python benchmarks/bench_harness.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402


def requests_for(task_name: str, data_dir: Path, limit: int, num_fewshot: int, max_gen_toks: int) -> list[Any]:
    """lm-eval Instances of ``task_name`` (the first ``limit`` documents), as simple_evaluate would build them."""
    from salm.harness import task_manager

    task = task_manager(data_dir, include_defaults=False).load([task_name])["tasks"][task_name]
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=1234)
    if task.get_config("output_type") == "generate_until":
        task.set_config(key="generation_kwargs", value={"max_gen_toks": max_gen_toks}, update=True)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return list(task.instances)


def timed(fn) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer documents, one repeat")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids spin-waits on a shared 2-core box)")
    p.add_argument("--out", default=str(common.RESULTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n_ll, n_gen, gen_toks = (10, 4, 16) if args.quick else (40, 16, 32)
    repeats = 1 if args.quick else 3

    from lm_eval.models.huggingface import HFLM

    from salm.ensemble import MultiModelWithScalarHeads
    from salm.harness.adapter import SalmLM
    from salm.harness.tasks.salm_local import data_dir
    from salm.members import load_member_set
    from salm.quickstart.build import build_quickstart_members

    data = data_dir(None if "SALM_DATA_DIR" in os.environ else {"data_dir": str(common.ROOT.parent / "shared/data")})
    if not (data / "medqa/test_4options.jsonl").is_file():
        sys.exit(f"the shared data is not at {data}; set SALM_DATA_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        art = build_quickstart_members(Path(tmp) / "members", size="tiny", progress=False)
        infos = load_member_set(art.members_file)
        torch.manual_seed(0)
        ensemble = MultiModelWithScalarHeads(infos, device="cpu").eval()
        general = infos[0]
        ll_reqs = requests_for("medqa_4options_local", data, n_ll, 0, gen_toks)
        gen_reqs = requests_for("gsm8k_local", data, n_gen, 0, gen_toks)
        common.log(f"{len(ll_reqs)} loglikelihood and {len(gen_reqs)} generate_until requests; members {art.root}")

        bs = args.batch_size
        models = {
            "salm_member": SalmLM(ensemble=ensemble, routing=f"member:{general.id}", batch_size=bs),
            "hf": HFLM(pretrained=general.path, device="cpu", batch_size=bs),
            "hf_no_logits_cache": HFLM(pretrained=general.path, device="cpu", batch_size=bs, logits_cache=False),
            "salm_ensemble": SalmLM(ensemble=ensemble, routing="argmax", batch_size=bs),
        }
        for info in infos[1:]:
            models[f"salm_member_{info.id}"] = SalmLM(ensemble=ensemble, routing=f"member:{info.id}", batch_size=bs)
        members_for_sum = ["salm_member"] + [f"salm_member_{i.id}" for i in infos[1:]]
        gen_models = ["salm_member", "hf", "salm_ensemble", *members_for_sum[1:]]

        ll_times: dict[str, list[float]] = {k: [] for k in models}
        gen_times: dict[str, list[float]] = {k: [] for k in gen_models}
        gen_tokens: dict[str, int] = {}
        for lm in models.values():  # warm-up: allocator, lazy inits, tokenizer caches
            lm.loglikelihood(ll_reqs[:4], disable_tqdm=True)
        for r in range(repeats):
            for name, lm in models.items():
                dt, _ = timed(lambda lm=lm: lm.loglikelihood(ll_reqs, disable_tqdm=True))
                ll_times[name].append(dt)
            for name in gen_models:
                lm = models[name]
                dt, outs = timed(lambda lm=lm: lm.generate_until(gen_reqs, disable_tqdm=True))
                gen_times[name].append(dt)
                gen_tokens[name] = sum(max(1, len(lm.tok_encode(o))) for o in outs)
            common.log(f"repeat {r + 1}/{repeats} done")

        med = {k: common.median(v) for k, v in ll_times.items()}
        gmed = {k: common.median(v) for k, v in gen_times.items()}
        per_tok = {k: gmed[k] / gen_tokens[k] for k in gmed}
        result = {
            "benchmark": "harness",
            "environment": common.environment("cpu"),
            "members": {"source": "salm quickstart --size tiny", "ids": [i.id for i in infos]},
            "batch_size": bs,
            "repeats": repeats,
            "loglikelihood": {
                "task": "medqa_4options_local (0-shot)",
                "requests": len(ll_reqs),
                "seconds": {k: common.summary(v) for k, v in ll_times.items()},
                "requests_per_s": {k: len(ll_reqs) / v for k, v in med.items()},
                "salm_member_over_hf_throughput": med["hf"] / med["salm_member"],
                "salm_member_over_hf_no_logits_cache_throughput": med["hf_no_logits_cache"] / med["salm_member"],
                "ensemble_over_sum_of_members": med["salm_ensemble"] / sum(med[k] for k in members_for_sum),
            },
            "generate_until": {
                "task": f"gsm8k_local (0-shot, max_gen_toks {gen_toks}, greedy)",
                "requests": len(gen_reqs),
                "seconds": {k: common.summary(v) for k, v in gen_times.items()},
                "requests_per_s": {k: len(gen_reqs) / v for k, v in gmed.items()},
                "generated_tokens": gen_tokens,
                "salm_member_over_hf_throughput": gmed["hf"] / gmed["salm_member"],
                "ensemble_over_sum_of_members_per_token": per_tok["salm_ensemble"]
                / sum(per_tok[k] for k in members_for_sum),
            },
            "target": "ensemble cost <= 1.1 x the sum of its members'",
        }
        path = common.write_json(Path(args.out) / "harness.json", result)
        common.log(f"wrote {path}")
        for part in ("loglikelihood", "generate_until"):
            r = result[part]
            common.log(f"{part}: " + ", ".join(f"{k} {v:.1f} req/s" for k, v in r["requests_per_s"].items()))
        common.log(
            "ensemble / sum of members: loglikelihood "
            f"{result['loglikelihood']['ensemble_over_sum_of_members']:.3f}, generation per token "
            f"{result['generate_until']['ensemble_over_sum_of_members_per_token']:.3f}"
        )


if __name__ == "__main__":
    main()
