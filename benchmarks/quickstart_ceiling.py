"""How much of the quickstart's per-token oracle gain can a router get? References, and heads by training text.

Issue #16 asks routers to capture >= 40 % of the oracle's NLL gain inside the code and prose domains and
>= 60 % on the mixed set. The oracle picks, per gold token and in hindsight, the member that gave it the
highest probability. This script measures two references that no deployable router beats by construction:

* **online mixture** (no training): a fixed-share Bayesian mixture of the members that, before each token,
  weighs every member by how well it predicted the text so far (prompt and answer) -- the signal of the
  ``aware`` router's history, used directly. Scored on the answer tokens over a small grid of learning rates
  and switching rates, and the best cell in hindsight is reported (optimistic: the grid is chosen on the test set);
* **in-sample heads**: ``aware`` heads (512 wide, no dropout, 60 epochs) trained *on the test set itself* and
  scored on it. Heads that memorise their test set bound from above what heads reading the same inputs can do on
  unseen text; where even they capture little, the gain is not predictable from those inputs.

Then deployable ``aware`` heads (``salm quickstart``'s settings), scored on the test domains and their pooled
set, trained on

* **the members' own training text** (400 examples per domain of the members' split): what the quickstart
  did before build version 2, where the members are far better than on new text;
* **held-out text**, 25 %, 50 % and 100 % of the quickstart's train split (no member trained on it): a
  learning curve. Where the captured share stops growing with more data, more data of this kind will not
  reach the issue's targets.

    python benchmarks/quickstart_ceiling.py   # default quickstart members (built or reused); ~4 min once built
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

OUT = common.RESULTS / "quickstart_ceiling.json"
GRID = [(eta, alpha) for eta in (0.5, 1.0) for alpha in (0.01, 0.05, 0.2)]


def member_logprobs(model, split) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example: every member's log-prob of each token given those before it [L, M], and which tokens
    are answer tokens [L] (what the evaluation scores)."""
    out = []
    for ids, labels in zip(split.input_ids, split.labels):
        x = torch.tensor([ids])
        mask = torch.ones_like(x)
        pos = torch.arange(x.shape[1])[None]
        cols = []
        for i in range(len(model.members)):
            h, lg, _ = model.run_member(i, x, mask, pos, None, slice(0, 0) if model._split_head(i) else None)
            cols.append(model.token_logprobs(i, h, None if model._split_head(i) else lg, x)[0])
        scored = torch.tensor(labels) != -100
        scored[0] = False
        out.append((torch.stack(cols, -1), scored))
    return out


def fixed_share_nll(seqs, eta: float, alpha: float) -> float:
    """Mean NLL on the answer tokens of a fixed-share mixture updated on every token (prompt included)."""
    total, n = 0.0, 0
    for lp, scored in seqs:
        M = lp.shape[1]
        w = torch.full((M,), 1.0 / M, dtype=torch.float64)
        for t in range(lp.shape[0]):
            x = lp[t].double()
            if scored[t]:
                total -= float(torch.logsumexp(w.log() + x, 0))
                n += 1
            if t:  # position 0 has no log-prob
                w = torch.softmax(w.log() + eta * x, 0)
                w = (1 - alpha) * w + alpha / M
    return total / n


def references(seqs) -> dict:
    lp = torch.cat([s[0][s[1]] for s in seqs])  # [T, M] answer tokens
    member = (-lp.mean(0)).tolist()
    best, oracle = min(member), float(-lp.max(-1).values.mean())
    cells = []
    for eta, alpha in GRID:
        nll = fixed_share_nll(seqs, eta, alpha)
        share = (best - nll) / (best - oracle)
        cells.append({"eta": eta, "alpha": alpha, "nll": round(nll, 5), "captured_share": share})
    top = max(cells, key=lambda c: c["captured_share"])
    return {
        "tokens": int(lp.shape[0]),
        "member_nll": [round(x, 5) for x in member],
        "best_member_nll": round(best, 5),
        "oracle_nll": round(oracle, 5),
        "online_mixture_grid": cells,
        "online_mixture_best": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in top.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    torch.set_num_threads(1)

    from salm.data import TrainingData, balance, row_to_example
    from salm.ensemble import MultiModelWithScalarHeads
    from salm.evaluation.analysis import combine_teacher_forced, teacher_forced_metrics
    from salm.features import tokenize_examples
    from salm.quickstart import DOMAINS, build_quickstart_members
    from salm.quickstart.build import recipe_for
    from salm.quickstart.corpora import MEMBERS_SPLIT, make_examples

    t0 = time.perf_counter()
    art = build_quickstart_members(size="default", seed=0, progress=False)
    model = MultiModelWithScalarHeads(str(art.members_file), 512, 0.0, device="cpu", dtype="float32").eval()
    tests = art.examples("test")
    tests["mixed"] = [ex for d in DOMAINS for ex in tests[d]]
    result: dict = {"what": __doc__.splitlines()[0], "environment": common.environment("cpu"), "domains": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for d, examples in tests.items():
            split = tokenize_examples(examples, model.tokenizer, model.context_length or (1 << 20), "answer", d)
            row = references(member_logprobs(model, split))
            model = common.train_quickstart_heads(
                art.members_file, TrainingData(train=examples, val=examples), f"{tmp}/{d}", model=model,
                num_epochs=args.epochs, warmup_steps=10, router="aware", head_hidden_dim=512, head_dropout=0.0,
                feature_cache_dir=f"{tmp}/features",
            )  # fmt: skip
            tf = teacher_forced_metrics(model, examples, batch_size=16)
            row["in_sample_heads"] = {
                "captured_share": round(tf["captured_share"], 4),
                "ensemble_nll": round(tf["ensemble_nll"], 5),
                "settings": {"router": "aware", "hidden_dim": 512, "dropout": 0.0, "epochs": args.epochs},
            }
            result["domains"][d] = row
            online, fitted = row["online_mixture_best"]["captured_share"], row["in_sample_heads"]["captured_share"]
            common.log(f"{d}: online mixture {online:.3f}, in-sample heads {fitted:.3f}")

        # Deployable heads by what they were trained on, scored on the test domains and the pooled set.
        corpus = recipe_for("default", 0).corpus
        own = {
            d: [
                row_to_example({"question": q, "answer": a}, dataset=d, split=MEMBERS_SPLIT, index=i)
                for i, (q, a) in enumerate(make_examples(d, 400, split=MEMBERS_SPLIT, config=corpus))
            ]
            for d in DOMAINS
        }
        held_out, val = balance(art.examples("train"), 0), balance(art.examples("validation"), 0)
        runs = {"members_own_text": balance(own, 0)}
        runs.update({f"held_out_{int(f * 100)}%": held_out[: round(len(held_out) * f)] for f in (0.25, 0.5, 1.0)})
        result["heads_by_training_text"] = {}
        for name, examples in runs.items():
            heads = common.train_quickstart_heads(
                art.members_file, TrainingData(train=examples, val=val), f"{tmp}/{name}"
            )
            tf = {d: teacher_forced_metrics(heads, tests[d], batch_size=16) for d in DOMAINS}
            tf["mixed"] = combine_teacher_forced([tf[d] for d in DOMAINS])
            result["heads_by_training_text"][name] = {
                "train_examples": len(examples),
                "captured_share": {d: round(m["captured_share"], 4) for d, m in tf.items()},
                "ensemble_nll": {d: round(m["ensemble_nll"], 5) for d, m in tf.items()},
            }
            common.log(f"heads on {name}: {result['heads_by_training_text'][name]['captured_share']}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    assert all(math.isfinite(r["oracle_nll"]) for r in result["domains"].values())
    common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
