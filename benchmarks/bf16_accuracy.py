"""bfloat16 against float32 on a real member: how much the CPU's ``dtype="auto"`` moves its answers.

On a CPU that multiplies bf16 natively, ``auto`` runs the members in bfloat16 (``salm/cpu.py``). That halves the
bytes a decode step reads; it also rounds every matmul to 8 bits of mantissa. This measures the cost where users
see it: one member (default: Qwen2.5-Coder-0.5B-Instruct from ``build_real_members.sh``) scored by
``salm harness`` in both dtypes on the same held-out documents, then per document and choice the
log-likelihood difference, the documents whose chosen answer changed, and the accuracies. An ensemble needs two
members, so the set is the member and its twin (the same folder): whatever the heads choose, the ensemble's
distribution is the member's own, and only the ensemble is scored.

    python benchmarks/bf16_accuracy.py --member /work/real/coder-05b --data_dir ../shared/data --limit 40
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DTYPES = ("float32", "bfloat16")


def run_harness(args: argparse.Namespace, members: Path, dtype: str) -> Path:
    out = Path(args.work) / dtype
    cmd = [
        sys.executable, "-m", "salm.cli", "harness", "--models", str(members), "--tasks", args.tasks, "--dtype",
        dtype, "--device", "cpu", "--limit", str(args.limit), "--output_dir", str(out), "--only_ensemble",
        "--no_plots", "--batch_size", "8", *(["--data_dir", args.data_dir] if args.data_dir else []),
    ]  # fmt: skip
    common.log(f"salm harness in {dtype} -> {out}")
    subprocess.run(cmd, check=True, cwd=common.ROOT)
    return out / "ensemble"


def samples(folder: Path) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for f in sorted(folder.glob("samples_*.jsonl")):
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        out[f.stem.removeprefix("samples_")] = {int(r["doc_id"]): r for r in rows}
    return out


def compare(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per task: the largest and mean |log-likelihood difference| over every choice, the documents whose chosen
    answer changed, and the accuracy in each dtype."""
    diffs, changed, acc = [], [], {d: 0 for d in DTYPES}
    for doc in sorted(set(a) & set(b)):
        la = [float(x[0]) for x in a[doc]["filtered_resps"]]
        lb = [float(x[0]) for x in b[doc]["filtered_resps"]]
        diffs += [abs(x - y) for x, y in zip(la, lb)]
        if max(range(len(la)), key=la.__getitem__) != max(range(len(lb)), key=lb.__getitem__):
            changed.append(doc)
        acc["float32"] += int(bool(a[doc]["acc"]))
        acc["bfloat16"] += int(bool(b[doc]["acc"]))
    n = len(set(a) & set(b))
    return {
        "documents": n,
        "choices": len(diffs),
        "loglik_abs_diff_max": max(diffs),
        "loglik_abs_diff_mean": sum(diffs) / len(diffs),
        "answers_changed": len(changed),
        "changed_documents": changed,
        "accuracy": {d: acc[d] / n for d in DTYPES},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--member", default="/work/real/coder-05b", help="a member folder (or hub id)")
    p.add_argument("--tasks", default="boolq,medqa_4options", help="log-likelihood tasks (salm harness names)")
    p.add_argument("--data_dir", default=str(common.ROOT.parent / "shared" / "data"))
    p.add_argument("--limit", type=int, default=40, help="documents per task")
    p.add_argument("--work", default=str(Path(common.tempfile_dir()) / "salm_bf16_accuracy"))
    p.add_argument("--out", default=str(common.RESULTS / "bf16_accuracy_cpu.json"))
    args = p.parse_args(argv)

    from salm.members import ModelInfo, write_member_set

    twins = [ModelInfo(mid, args.member, args.member) for mid in ("member", "twin")]
    members = write_member_set(Path(args.work) / "members.json", twins)
    folders = {d: run_harness(args, members, d) for d in DTYPES}
    got = {d: samples(f) for d, f in folders.items()}
    tasks = {t: compare(got["float32"][t], got["bfloat16"][t]) for t in got["float32"] if t in got["bfloat16"]}
    result = {
        "benchmark": "bf16_accuracy",
        "member": args.member,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "tasks": tasks,
        "environment": common.environment("cpu"),
    }
    common.write_json(args.out, result)
    for t, r in tasks.items():
        print(
            f"{t}: {r['documents']} docs, |dLL| max {r['loglik_abs_diff_max']:.3f} "
            f"mean {r['loglik_abs_diff_mean']:.4f}, "
            f"answers changed {r['answers_changed']}, acc fp32 {r['accuracy']['float32']:.3f} "
            f"bf16 {r['accuracy']['bfloat16']:.3f}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
