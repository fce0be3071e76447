"""How fast ``salm finetune`` trains a LoRA specialist on the CPU, and what a few thousand tokens of GSM8K do.

Speed: the real base (default the hub's Qwen/Qwen2.5-Coder-0.5B-Instruct; pass a local folder with --base), LoRA
r=16 on every attention and MLP projection, batch 4 x 256 tokens (packed text windows of GSM8K solutions, so
every step is exactly 1024 tokens), --steps optimizer steps per dtype through ``salm.finetune.finetune`` itself.
Each variant (bf16, fp32, bf16 with --gradient_checkpointing) runs in its own process (its own peak RSS), the
order rotated over --repeats; tokens/s is 1024 / the median step time, the first step of each process left out
(allocation warm-up); on a shared machine the step's CPU time gives what the cores alone would do.

GSM8K mini-run (--gsm8k): the first --train_rows rows of GSM8K's train split as question/answer data (loss on
the answer, in saLM's prompt and answer format), the held-out loss measured on the split's last --eval_rows rows
before and after. Both need ../shared/data (or --gsm8k_file); the speed part falls back to generated text.

    python benchmarks/bench_finetune.py --base /path/to/coder-05b [--steps 4] [--repeats 1] [--gsm8k]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    ROOT,
    Contention,
    core_count,
    environment,
    load_average,
    log,
    median,
    write_json,
)

GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
OUT = RESULTS / "finetune_cpu.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gsm8k_rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def solutions_text(path: Path, folder: Path, chars: int) -> Path:
    """GSM8K questions and solutions as one plain-text file of at least ``chars`` characters."""
    if path.is_file():
        parts, n = [], 0
        for row in gsm8k_rows(path):
            parts.append(f"{row['question']}\n{row['answer']}\n")
            n += len(parts[-1])
            if n >= chars:
                break
        text = "\n".join(parts)
    else:
        text = "".join(
            f"Tom has {i} apples and buys {i + 3} more, so he has {2 * i + 3}.\n" for i in range(chars // 40)
        )
    out = folder / "solutions.txt"
    out.write_text(text, encoding="utf-8")
    return out


VARIANTS = ("bfloat16", "float32", "bfloat16+checkpointing")


def one_speed_run(args: argparse.Namespace) -> dict[str, Any]:
    """One variant (a dtype, + gradient checkpointing), in this process: ``--steps`` steps of batch 4 x 256 tokens."""
    from salm.finetune import FinetuneConfig, finetune

    dtype, _, extra = args.one.partition("+")

    with tempfile.TemporaryDirectory() as tmp:
        text = solutions_text(args.gsm8k_file, Path(tmp), chars=args.steps * 4 * 256 * 6)
        cfg = FinetuneConfig(
            base=args.base, data=[str(text)], output_dir=str(Path(tmp) / "out"), lora_r=16, lora_alpha=32.0,
            target_modules=TARGETS, max_steps=args.steps, batch_size=4, max_length=256, dtype=dtype,
            gradient_checkpointing=extra == "checkpointing", save_every=10**6, progress=False,
        )  # fmt: skip
        window = Contention()
        result = finetune(cfg)
        others = window.cores_used_by_others()
    curve = result.report["loss_curve"]
    steps = [r["seconds"] for r in curve]
    tokens = [r["tokens"] for r in curve]
    assert set(tokens) == {4 * 256}, tokens  # every step: 4 full windows
    cpu = [r["cpu_seconds"] for r in curve]
    timed, cpu_timed = steps[1:] or steps, cpu[1:] or cpu
    cores = core_count()
    return {
        "variant": args.one,
        "step_seconds": steps,
        "step_cpu_seconds": cpu,
        "median_step_s_after_first": round(median(timed), 3),
        "tokens_per_s": round(4 * 256 / median(timed), 1),
        # what the step's CPU work would take on this machine's cores alone (other processes took turns on them)
        f"tokens_per_s_if_{cores}_cores_were_ours": round(4 * 256 * cores / median(cpu_timed), 1),
        "loss": [r["loss"] for r in curve],
        "load_s": result.report["timing"]["load_s"],
        "trainable_parameters": result.report["trainable_parameters"],
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "cpu_cores_used_by_other_processes": None if others is None else round(others, 2),
    }


def speed(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    variants = list(args.variants)
    for r in range(args.repeats):
        for variant in variants[r % len(variants) :] + variants[: r % len(variants)]:  # rotated between repeats
            log(f"repeat {r + 1}: {variant}, {args.steps} steps (load average {load_average()})")
            cmd = [sys.executable, __file__, "--one", variant, "--base", args.base, "--steps", str(args.steps),
                   "--gsm8k_file", str(args.gsm8k_file)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            log(f"  {runs[-1]['tokens_per_s']} tokens/s, steps {runs[-1]['step_seconds']}")
    idle = f"tokens_per_s_if_{core_count()}_cores_were_ours"
    by = {v: [x["tokens_per_s"] for x in runs if x["variant"] == v] for v in variants}
    by_cpu = {v: [x[idle] for x in runs if x["variant"] == v] for v in variants}
    return {
        "setup": "LoRA r=16, alpha 32, every attention and MLP projection; batch 4 x 256 tokens (packed text); "
        "AdamW; tokens/s = 1024 / median step time (first step of each process left out); "
        f"{idle} = 1024 x cores / median CPU seconds of a step (the process's own CPU time)",
        "runs": runs,
        "tokens_per_s": {d: median(v) for d, v in by.items()},
        idle: {d: median(v) for d, v in by_cpu.items()},
        "peak_rss_gib": {v: max(x["peak_rss_gib"] for x in runs if x["variant"] == v) for v in variants},
        "bf16_over_fp32": round(median(by["bfloat16"]) / median(by["float32"]), 3),
        "bf16_over_fp32_cpu_time": round(median(by_cpu["bfloat16"]) / median(by_cpu["float32"]), 3),
    }


def gsm8k_mini_run(args: argparse.Namespace) -> dict[str, Any]:
    from salm.finetune import FinetuneConfig, finetune
    from salm.finetune.outputs import REPORT

    rows = gsm8k_rows(args.gsm8k_file)
    with tempfile.TemporaryDirectory() as tmp:
        train, held_out = Path(tmp) / "train.jsonl", Path(tmp) / "held_out.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.train_rows]), encoding="utf-8")
        held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[-args.eval_rows :]), encoding="utf-8")
        cfg = FinetuneConfig(
            base=args.base, data=[str(train)], eval_data=[str(held_out)], output_dir=str(Path(tmp) / "out"),
            num_epochs=args.epochs, learning_rate=args.learning_rate, batch_size=4, max_length=256,
            dtype="bfloat16", progress=False,
        )  # fmt: skip
        t0, load0 = time.perf_counter(), load_average()
        window = Contention()
        result = finetune(cfg)
        others = window.cores_used_by_others()
        report = json.loads((Path(tmp) / "out" / REPORT).read_text())
    return {
        "train_rows": f"gsm8k train rows 1-{args.train_rows} (question/answer, loss on the answer)",
        "held_out_rows": f"gsm8k train rows {len(rows) - args.eval_rows + 1}-{len(rows)}",
        "settings": {k: report["settings"][k] for k in ("lora_r", "lora_alpha", "lora_dropout", "learning_rate",
                                                         "num_epochs", "batch_size", "max_length", "dtype")},
        "steps": result.steps,
        "tokens_seen": report["tokens_seen"],
        "answer_tokens_seen": report["loss_tokens_seen"],
        "held_out_loss": report["eval_loss"],
        "train_loss_curve": [r["loss"] for r in report["loss_curve"]],
        "timing": report["timing"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "load_average_at_start": load0,
        "cpu_cores_used_by_other_processes": None if others is None else round(others, 2),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="Qwen/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per speed run")
    p.add_argument("--repeats", type=int, default=1, help="speed runs per variant (order rotated between repeats)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--gsm8k_file", type=Path, default=GSM8K)
    p.add_argument("--gsm8k", action="store_true", help="also the GSM8K mini-run")
    p.add_argument("--no_speed", action="store_true", help="skip the speed runs (keep the file's)")
    p.add_argument("--train_rows", type=int, default=24)
    p.add_argument("--eval_rows", type=int, default=48)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one dtype's run, JSON on stdout
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_speed_run(args)))
        return
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.update(base=args.base, environment=environment("cpu"))
    if not args.no_speed:
        result["speed"] = speed(args)
    if args.gsm8k:
        log("GSM8K mini-run")
        result["gsm8k_mini_run"] = gsm8k_mini_run(args)
    result["load_average_at_end"] = load_average()
    write_json(args.out, result)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
