"""The quickstart's design choices, measured: entropy weight, loss positions, routing mode, training length.

Each variant is a full ``salm quickstart`` run (same cached members, same data, same seed) that differs
from the default in one setting; the JSON records, per variant, what the quickstart's checks look at.

    python benchmarks/quickstart_ablations.py            # ~8 minutes on 2 CPU cores (members cached)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from salm.quickstart.run import EXPECTED_MEMBER, QuickstartSettings, run_quickstart

RESULTS = Path(__file__).resolve().parent / "results" / "quickstart_ablations.json"

VARIANTS: dict[str, dict] = {
    "default": {},
    "entropy_weight=0.01": {"entropy_weight": 0.01},
    "entropy_weight=0.1 (seed)": {"entropy_weight": 0.1},
    "loss_on=all": {"loss_on": "all"},
    "routing=mixture": {"routing": "mixture"},
    "routing=threshold:0.5": {"routing": "threshold:0.5"},
    "seed's training settings": {
        "num_epochs": 5,
        "batch_size": 4,
        "learning_rate": 1e-4,
        "warmup_steps": 50,
        "entropy_weight": 0.1,
    },  # fmt: skip
}


def digest(summary: dict) -> dict:
    nll = summary["nll"]
    return {
        "router_share_to_expected": {d: round(nll[d]["router_share"][m], 4) for d, m in EXPECTED_MEMBER.items()},
        "ensemble_over_best": {d: round(r["ensemble_over_best"], 4) for d, r in nll.items()},
        "ensemble_nll": {d: round(r["ensemble"], 4) for d, r in nll.items()},
        "best_member_nll": {d: round(min(r["members"].values()), 4) for d, r in nll.items()},
        "captured_share": {
            d: None if r["captured_share"] is None else round(r["captured_share"], 4) for d, r in nll.items()
        },  # fmt: skip
        "arithmetic_accuracy": {m: a["accuracy"] for m, a in summary["arithmetic"].items()},
        "generation_routing": summary["generation_routing"],
        "checks": summary["checks"],
        "all_checks_pass": all(summary["checks"].values()),
        "seconds": summary["seconds"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    args = p.parse_args()
    base = QuickstartSettings(progress=False, plots=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, change in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            s = dataclasses.replace(base, output_dir=str(Path(tmp) / f"v{len(results)}"), **change)
            t = time.perf_counter()
            results[name] = {"change": change, **digest(run_quickstart(s))}
            print(f"{name}: {time.perf_counter() - t:.0f}s {json.dumps(results[name]['router_share_to_expected'])} "
                  f"{json.dumps(results[name]['ensemble_over_best'])} acc {results[name]['arithmetic_accuracy']}",
                  file=sys.stderr, flush=True)  # fmt: skip
    out = {
        "what": "salm quickstart variants, each differing from the default in one setting",
        "default_settings": dataclasses.asdict(base),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "variants": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
