"""How long training takes with the feature cache, without it (the seed's way), and one frozen forward pass.

Tiny random members built offline (salm.testing), deep and wide enough that the member forward dominates
as it does with real 1.5B members, on the first GSM8K rows from ../shared/data (or generated arithmetic
when that folder is absent). "One forward pass" runs every member over train + validation once, in
batches of --batch_size examples, computing hidden states and full logits, i.e. what one epoch of the
seed's training spends in the members. Target: 5 epochs on the cache (extraction included) <= 1.25x that.

    python benchmarks/bench_training.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
RESULTS = ROOT / "benchmarks" / "results" / "training.json"
TARGET = 1.25


def rows(n: int) -> tuple[list[dict], str]:
    if GSM8K.is_file():
        with GSM8K.open() as f:
            return [json.loads(next(f)) for _ in range(n)], str(GSM8K.relative_to(ROOT.parent))
    out = []
    for i in range(n):
        a, b = 7 * i % 97, 13 * i % 89
        q = f"Tom has {a} apples and buys {b} more. How many apples does he have now?"
        out.append({"question": q, "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"})
    return out, "generated arithmetic"


# (hidden, layers) per member; MLP 4x hidden and an LM head of LM_HEAD_ROWS rows (the tokenizer uses the first
# 1000) so that, as in a real member, the LM head is a sizeable share of the forward and the heads' cost is small.
SHAPES = [(96, 4), (128, 6), (128, 6)]
LM_HEAD_ROWS = 4096


def build_members(root: Path, texts: list[str]):
    from salm.members import ModelInfo
    from salm.testing import build_member, build_tokenizer

    tok = build_tokenizer(vocab_size=1000, corpus=texts)
    infos = []
    for i, (h, layers) in enumerate(SHAPES):
        path = build_member(
            root / f"m{i}", tok, seed=i, hidden_size=h, layers=layers, intermediate_size=4 * h,
            vocab_size=LM_HEAD_ROWS, max_position_embeddings=512,
        )  # fmt: skip
        infos.append(ModelInfo(f"m{i}", f"member {i}", str(path)))
    return infos


def forward_pass(model, data, cfg) -> float:
    """One plain frozen forward pass of all members over train + val (hidden states and full logits)."""
    from salm.features import collate, tokenize_examples

    t = time.perf_counter()
    for exs, name in ((data.train, "train"), (data.val, "val")):
        split = tokenize_examples(exs, model.tokenizer, cfg.data.max_length, cfg.data.loss_on, name)
        for a in range(0, len(split), cfg.optim.batch_size):
            ids, mask, _ = collate(split, list(range(a, min(a + cfg.optim.batch_size, len(split)))), 0)
            with torch.no_grad():
                model.member_outputs(ids, mask)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer examples, one repeat")
    p.add_argument("--examples", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids spin-waits on a shared 2-core box)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    n = args.examples or (60 if args.quick else 120)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from salm.data import load_training_sets
    from salm.ensemble import MultiModelWithScalarHeads
    from salm.training import TrainConfig, train

    data_rows, source = rows(n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f = tmp / "gsm8k.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in data_rows))
        data = load_training_sets([str(f)], val_fraction=0.1, seed=42)
        infos = build_members(tmp / "members", [r["question"] + "\n" + r["answer"] for r in data_rows])
        model = MultiModelWithScalarHeads(infos, device="cpu")
        base = dict(
            datasets=[str(f)], num_epochs=args.epochs, batch_size=4, plots=False, progress=False, log_every_n_steps=5
        )
        times: dict[str, list[float]] = {"forward": [], "cache": [], "nocache": []}
        extraction: list[float] = []
        heads: list[float] = []
        forward_pass(model, data, TrainConfig.from_flat(**base))  # warm-up (allocator, lazy inits)
        for r in range(repeats):
            times["forward"].append(forward_pass(model, data, TrainConfig.from_flat(**base)))
            t = time.perf_counter()
            res = train(
                TrainConfig.from_flat(**base, output_dir=str(tmp / f"c{r}"), feature_cache_dir=str(tmp / f"fc{r}")),
                model,
                data,
            )
            times["cache"].append(time.perf_counter() - t)
            extraction.append(res.report["timing"]["features_s"])
            heads.append(res.report["timing"]["train_s"])
            t = time.perf_counter()
            train(TrainConfig.from_flat(**base, output_dir=str(tmp / f"n{r}"), feature_cache=False), model, data)
            times["nocache"].append(time.perf_counter() - t)
            print({k: round(v[-1], 2) for k, v in times.items()}, file=sys.stderr)
        report = res.report

    med = {k: statistics.median(v) for k, v in times.items()}
    # Ratios are formed inside each repeat (same machine state for numerator and baseline), then the median.
    paired = {k: [t / f for t, f in zip(times[k], times["forward"])] for k in ("cache", "nocache")}
    ratios = {f"{k}_over_forward": statistics.median(v) for k, v in paired.items()}
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
        "settings": {
            "data": source,
            "examples": n,
            "train_examples": report["data"]["tokenized"]["train"]["examples"],
            "val_examples": report["data"]["tokenized"]["val"]["examples"],
            "loss_positions_train": report["data"]["tokenized"]["train"]["loss_positions"],
            "members": [
                {"id": m.id, "hidden": mm.config.hidden_size, "layers": mm.config.num_hidden_layers}
                for m, mm in zip(model.infos, model.members)
            ],
            "vocab": model.vocab_size,
            "lm_head_rows": LM_HEAD_ROWS,
            "mlp": "4x hidden",
            "epochs": args.epochs,
            "batch_size": 4,
            "max_length": 256,
            "loss_on": "answer",
            "repeats": repeats,
            "quick": args.quick,
        },
        "raw_s": times,
        "cache_breakdown_s": {"feature_extraction": extraction, "epochs_on_cache_incl_validation": heads},
        "paired_ratios": {f"{k}_over_forward": v for k, v in paired.items()},
        "median_s": med,
        "ratios": ratios,
        "target": {"cache_over_forward_max": TARGET, "met": ratios["cache_over_forward"] <= TARGET},
    }
    from salm.io import atomic_write_json

    atomic_write_json(args.out, result)
    print(json.dumps({"median_s": med, "ratios": result["ratios"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
