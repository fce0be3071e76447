"""Do ``salm train``'s default optimisation settings train the heads? Measured on small and larger data.

Each suite trains the same heads (same members, data, seed, router) three ways and records validation NLL
before and after training, the routing share per dataset and, on the knowledge split, test accuracy:

- ``seed_defaults``: the seed's settings, explicit (5 epochs, batch 4, lr 1e-4, ``--warmup_steps 50``);
- ``defaults``: nothing set (whatever :class:`salm.training.OptimConfig` defaults to in the code that runs);
- ``tuned``: the settings the suite's own command uses (quickstart, knowledge) or lr 3e-3 for 20 epochs
  (real members).

Suites: ``quickstart`` (the embedded members, 3 domains, ~1,000 train rows), ``knowledge`` (the knowledge
split, 216 train rows), ``real`` (two real members, first 24 rows each of GSM8K/MedQA/BoolQ from
``--shared_data``, a quarter held out: 54 train rows; needs ``--members``). Members are built or reused from
the cache (``$SALM_CACHE``); features are extracted once per suite and reused by every training.

    python benchmarks/training_defaults.py --suite quickstart knowledge
    python benchmarks/training_defaults.py --suite real --members /work/real/members.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "training_defaults.json"
SEED_DEFAULTS = {"num_epochs": 5, "batch_size": 4, "learning_rate": 1e-4, "warmup_steps": 50}


def _val_references(report: dict[str, Any]) -> dict[str, float]:
    """Validation NLL of each member alone and of the oracle (the best member at each position), from the
    gold log-probs in the run's feature cache: the bounds the trained mixture sits between."""
    import numpy as np

    path = Path(report["feature_cache"]["val"]["path"])
    n_members = len(report["members"])
    gold = np.fromfile(path / "gold.bin", dtype=np.float32).reshape(-1, n_members).astype(np.float64)
    refs = {m["id"]: round(float(-gold[:, i].mean()), 4) for i, m in enumerate(report["members"])}
    return {**refs, "oracle": round(float(-gold.max(1).mean()), 4)}


def _summary(result: Any) -> dict[str, Any]:
    """What a run did: steps, warm-up, validation NLL before/best, the share of the oracle's gain over the
    untrained (uniform) mixture it captured, and the routing share at the best epoch."""
    rep = result.report
    oracle = _val_references(rep)["oracle"]
    return {
        "steps": rep["steps"]["total"],
        "warmup_steps": rep["steps"].get("warmup"),
        "learning_rate_sum": rep["steps"].get("learning_rate_sum"),
        "settings": {
            k: rep["settings"].get(k)
            for k in ("num_epochs", "batch_size", "learning_rate", "warmup_steps", "warmup_ratio")
        },  # fmt: skip
        "initial_val_nll": round(result.initial_val_nll, 4),
        "best_val_nll": round(result.best_val_nll, 4),
        "best_epoch": result.best_epoch,
        "captured_share": round((result.initial_val_nll - result.best_val_nll) / (result.initial_val_nll - oracle), 3),
        "routing_share_val": {
            d: {m: round(v, 3) for m, v in row.items()} for d, row in rep["routing_share_val"]["best"].items()
        },
    }


EXTRA: dict[str, dict[str, Any]] = {}  # --variant NAME=JSON: more settings to compare


def _variants(tuned: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"seed_defaults": dict(SEED_DEFAULTS), "defaults": {}, "tuned": tuned, **EXTRA}


def _train_all(base: dict[str, Any], data: Any, tuned: dict[str, Any], out: Path, evaluate=None) -> dict[str, Any]:
    from salm.training import TrainConfig, train

    runs: dict[str, Any] = {}
    model = None
    for name, kw in _variants(tuned).items():
        t = time.perf_counter()
        cfg = TrainConfig.from_flat(**{**base, **kw, "output_dir": str(out / name)})
        result = train(cfg, model=model, data=data)
        model = result.model
        runs[name] = _summary(result)
        if evaluate is not None:
            runs[name]["test"] = evaluate(result.best_model())
        runs[name]["seconds"] = round(time.perf_counter() - t, 1)
        print(name, json.dumps(runs[name]), file=sys.stderr)
    tokenized = result.report["data"]["tokenized"]
    rows = {"train_rows": tokenized["train"]["examples"], "val_rows": tokenized["val"]["examples"]}
    return {**rows, "val_nll_alone": _val_references(result.report), "runs": runs}


def quickstart_suite(out: Path) -> dict[str, Any]:
    from salm.data import TrainingData, balance
    from salm.quickstart.build import build_quickstart_members, deterministic_torch, recipe_for
    from salm.quickstart.run import QuickstartSettings

    s = QuickstartSettings(plots=False, progress=False)
    with deterministic_torch(recipe_for(s.size, s.seed).torch_threads):
        art = build_quickstart_members(size=s.size, seed=s.seed, progress=False)
        data = TrainingData(
            train=balance(art.examples("train"), s.seed), val=balance(art.examples("validation"), s.seed)
        )
        tuned_cfg = s.train_config(art.members_file, out)
        base = {
            k: v
            for k, v in tuned_cfg.settings().items()
            if k in ("datasets", "seed", "models", "device", "dtype", "loss_on", "plots", "router", "entropy_weight")
        }
        base.update(feature_cache_dir=str(out / "feature_cache"), progress=False)
        tuned = {k: tuned_cfg.settings()[k] for k in ("num_epochs", "batch_size", "learning_rate", "warmup_steps")}
        runs = _train_all(base, data, tuned, out)
    return runs


def knowledge_suite(out: Path) -> dict[str, Any]:
    from salm.data import TrainingData
    from salm.quickstart import knowledge as kn

    recipe = kn.knowledge_recipe("default", 0)
    root, _ = kn.build_knowledge_members(recipe, None, False)
    by_role: dict[str, list[Any]] = {}
    for f in kn.make_facts(recipe):
        by_role.setdefault(f.role, []).append(f)
    data = TrainingData(
        train=[kn.fact_example(f, i) for i, f in enumerate(by_role["train"])],
        val=[kn.fact_example(f, i) for i, f in enumerate(by_role["validation"])],
    )
    base = dict(
        datasets=kn.member_ids(recipe), seed=0, models=str(root / "members.yaml"), device="cpu", dtype="float32",
        max_length=64, entropy_weight=0.0, feature_cache_dir=str(out / "feature_cache"), plots=False, progress=False,
    )  # fmt: skip
    tuned = {"num_epochs": 20, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 10}  # run_knowledge's

    def test_accuracy(model: Any) -> dict[str, Any]:
        r = kn.evaluate_knowledge(model, by_role["test"])
        return {k: r[k] for k in ("generated_accuracy", "decisive_routed_to_owner")}

    runs = _train_all(base, data, tuned, out, evaluate=test_accuracy)
    return runs


REAL_FILES = {"gsm8k": "gsm8k/train.jsonl", "medqa": "medqa/test_4options.jsonl", "boolq": "boolq/validation.jsonl"}
REAL_ROWS = 24  # per dataset; a quarter held out: 54 training rows, the size of the run the defaults failed on


def real_suite(out: Path, members: str, shared_data: Path) -> dict[str, Any]:
    """The first rows of each public file in ``shared_data`` (the README's ``../shared/data``), as written."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, rel in REAL_FILES.items():
        rows = (shared_data / rel).read_text(encoding="utf-8").splitlines(keepends=True)[:REAL_ROWS]
        (out / f"{name}.jsonl").write_text("".join(rows), encoding="utf-8")
        files.append(str(out / f"{name}.jsonl"))
    base = dict(
        datasets=files, models=members, val_fraction=0.25, device="cpu", dtype="bfloat16",
        feature_cache_dir=str(out / "feature_cache"), plots=False, progress=False,
    )  # fmt: skip
    runs = _train_all(base, None, {"num_epochs": 20, "learning_rate": 3e-3}, out)
    return {"members": members, "rows_per_dataset": REAL_ROWS, **runs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", nargs="+", choices=["quickstart", "knowledge", "real"], required=True)
    p.add_argument("--out", default="training_defaults_runs", help="training folders and feature caches")
    p.add_argument("--members", help="members file for --suite real")
    p.add_argument("--shared_data", type=Path, default=ROOT.parent / "shared" / "data", help="for --suite real")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--variant", action="append", default=[], help="another run: NAME='{\"learning_rate\": 1e-3}'")
    a = p.parse_args()
    for v in a.variant:
        name, settings = v.split("=", 1)
        EXTRA[name] = json.loads(settings)
    results = json.loads(a.results.read_text()) if a.results.is_file() else {}
    for suite in a.suite:
        out = Path(a.out) / suite
        if suite == "quickstart":
            results[suite] = quickstart_suite(out)
        elif suite == "knowledge":
            results[suite] = knowledge_suite(out)
        else:
            results[suite] = real_suite(out, a.members, a.shared_data)
        a.results.parent.mkdir(parents=True, exist_ok=True)
        a.results.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
