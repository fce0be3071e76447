"""Router variants side by side: the knowledge split, the quickstart domains and their mixed set.

For every variant of :data:`salm.quickstart.knowledge.ROUTER_VARIANTS` (router x loss option), heads are
trained by ``salm train``'s own code on the same cached features (same members, data and seed), then:

* knowledge split (``salm knowledge``): generated-answer accuracy against each member and the oracle,
  decisive-token accuracy, routing of the decisive token to the member that knows, captured share;
* quickstart (default size, the ``salm quickstart`` head-training settings), per test domain and on the
  pooled mixed set: captured share of the oracle's NLL gain, ensemble NLL (and its ratio to the seed
  heads'), router share, and token accuracy where the members' argmax tokens disagree.

    python benchmarks/self_aware_routing.py --skip quickstart                       # knowledge split, ~4 min
    python benchmarks/self_aware_routing.py --skip knowledge --quickstart_size tiny  # quickstart, tiny size
    python benchmarks/self_aware_routing.py --skip knowledge --variants seed confidence  # default size
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "self_aware_routing.json"
TARGETS = {"knowledge_over_oracle": 0.90, "captured_code_prose": 0.40, "captured_mixed": 0.60, "nll_vs_seed": 1.005}


def quickstart_variants(variants: list[str], seed: int, out: Path, progress: bool, size: str = "default") -> dict:
    from salm.data import TrainingData, balance
    from salm.evaluation.analysis import combine_teacher_forced, teacher_forced_metrics
    from salm.quickstart import DOMAINS, build_quickstart_members
    from salm.quickstart.knowledge import ROUTER_VARIANTS, token_choices

    art = build_quickstart_members(size=size, seed=seed, progress=progress)
    load = {s: art.examples(s) for s in ("train", "validation", "test")}
    data = TrainingData(train=balance(load["train"], seed), val=balance(load["validation"], seed))
    results, model = {}, None
    for name in variants:
        t = time.perf_counter()
        model = common.train_quickstart_heads(
            art.members_file, data, out / name, seed, model=model, feature_cache_dir=str(out / "feature_cache"),
            progress=progress, **ROUTER_VARIANTS[name],
        )  # fmt: skip
        tf = {d: teacher_forced_metrics(model, load["test"][d], batch_size=16) for d in DOMAINS}
        tf["mixed"] = combine_teacher_forced([tf[d] for d in DOMAINS])
        row = {}
        tok = {}
        for d in DOMAINS:
            right, routed, _, differ, _, _ = token_choices(model, load["test"][d])
            tok[d] = (right, routed, differ)
        tok["mixed"] = tuple(torch.cat([tok[d][i] for d in DOMAINS]) for i in range(3))
        for d, m in tf.items():
            right, routed, differ = tok[d]
            rows = torch.arange(len(routed))
            ens_right = right[rows, routed]
            row[d] = {
                "captured_share": None if m["captured_share"] is None else round(m["captured_share"], 4),
                "ensemble_nll": round(m["ensemble_nll"], 5),
                "oracle_nll": round(m["oracle_nll"], 5),
                "best_member": m["best_member"],
                "best_member_nll": round(m["best_member_nll"], 5),
                "router_share": {k: round(v, 4) for k, v in m["router_share"].items()},
                "token_accuracy": round(float(ens_right.float().mean()), 4),
                "disagreement_positions": int(differ.sum()),
                "disagreement_accuracy": {
                    "ensemble": round(float(ens_right[differ].float().mean()), 4),
                    "oracle": round(float(right[differ].any(-1).float().mean()), 4),
                    **{mid: round(float(right[differ, i].float().mean()), 4) for i, mid in enumerate(model.model_ids)},
                },
            }
        results[name] = {
            "settings": ROUTER_VARIANTS[name],
            "domains": row,
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(f"quickstart {name}: " + json.dumps({d: r["captured_share"] for d, r in row.items()}), file=sys.stderr)
    if "seed" in results:
        for r in results.values():
            for d, x in r["domains"].items():
                x["nll_vs_seed"] = round(x["ensemble_nll"] / results["seed"]["domains"][d]["ensemble_nll"], 5)
    return results


def main() -> int:
    from salm.io import atomic_write_json
    from salm.quickstart.knowledge import ROUTER_VARIANTS, run_knowledge

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--variants", nargs="*", default=list(ROUTER_VARIANTS))
    p.add_argument("--skip", nargs="*", default=[], choices=["knowledge", "quickstart"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quickstart_size", default="default", choices=["default", "tiny"])
    args = p.parse_args()
    torch.set_num_threads(1)  # small members on a shared machine: one thread never stalls at OpenMP barriers
    # Each part is written as soon as it is done, into the same file (a part not run keeps its old result).
    path = Path(args.out)
    out: dict = json.loads(path.read_text()) if path.is_file() else {}
    out.update(
        what="router variants (router x loss option) on the knowledge split and the quickstart domains",
        targets=TARGETS,
        machine={"python": platform.python_version(), "platform": platform.platform(), "torch_threads": 1},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "knowledge" not in args.skip:
            t0 = time.perf_counter()
            k = run_knowledge("default", args.seed, Path(tmp) / "knowledge", args.variants, progress=False)
            out["knowledge"] = {key: k[key] for key in ("recipe", "build", "test_questions", "variants")}
            out["knowledge"]["seconds"] = round(time.perf_counter() - t0, 1)
            atomic_write_json(path, out)
        if "quickstart" not in args.skip:
            t0 = time.perf_counter()
            key = "quickstart" if args.quickstart_size == "default" else f"quickstart_{args.quickstart_size}"
            qs = Path(tmp) / "quickstart"
            out[key] = quickstart_variants(args.variants, args.seed, qs, False, args.quickstart_size)
            out[f"{key}_seconds"] = round(time.perf_counter() - t0, 1)
            atomic_write_json(path, out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
