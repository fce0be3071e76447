"""Adapter members on one base: resident memory, and a routed decode step against the base alone.

Three LoRA adapters (rank 16 on every attention and MLP projection, as PEFT users train them) of one base, plus
the base itself as a member, all sharing one copy of the base weights (:mod:`salm.adapters`). Measured:

- memory (a fresh child process per case): resident memory after loading the ensemble, net of the process
  after imports, against the weights it needs (one base + the adapters) and against what separate merged
  members would need (one base per member);
- the decode step (per step = ``(T(new) - T(1)) / (new - 1)``, batch 1, greedy, EOS ignored, repeats interleaved):
  ``base``: routing ``member:general`` (the base alone, one forward per step); ``routed3``: the three adapter
  members routed per token (argmax, the ``aware`` router), one grouped forward per step; ``routed4``: the base and
  the three adapters; ``apart4``: the same four members run one forward each (saLM without grouping); and, with
  ``--peft_reference``, PEFT's own mixed batch (``adapter_names``, one row per adapter) in its ``generate``.

    python benchmarks/bench_adapters.py                          # Qwen2.5-0.5B architecture, random weights
    python benchmarks/bench_adapters.py --base /path/to/hf/folder  # a real base
    python benchmarks/bench_adapters.py --quick                  # smoke: 2-layer base
    python benchmarks/bench_adapters.py --device cuda --peft_reference  # on a GPU -> results/adapters_gpu.json
    python benchmarks/bench_adapters.py --device cuda --only speed --compile --cases routed3,routed3_compiled
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET_STEP_RATIO = 1.5  # routed step with 3 adapter members <= 1.5 x the base's own step (batch 1)
TARGET_MEMORY_RATIO = 1.2  # resident memory <= 1.2 x (base + adapters)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MiB = 2**20


def build(root: Path, base: str | None, quick: bool, rank: int, n_adapters: int) -> tuple[Path, list[Path]]:
    """The base folder (a random Qwen2.5-0.5B-architecture model unless ``base``) and ``n_adapters`` LoRA adapters."""
    from salm.testing import build_lora_adapter

    tok = common.bench_tokenizer()
    if base is None:
        folder = root / "base"
        if not (folder / "config.json").is_file():
            cfg = common.qwen_config("qwen2.5-0.5b", tok, layers=2 if quick else None)
            model = common.build_random_member(cfg, seed=0, dtype=torch.bfloat16)
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            del model
    else:
        folder = Path(base)
    adapters = []
    for k in range(n_adapters):
        out = root / f"lora{k}"
        if not (out / "adapter_config.json").is_file():
            common.log(f"building adapter {k} (rank {rank})")
            build_lora_adapter(folder, out, seed=k + 1, r=rank, target_modules=TARGETS, scale=0.02)
        adapters.append(out)
    return folder, adapters


def infos(base: Path, adapters: list[Path], with_base: bool = True) -> list[Any]:
    from salm.members import ModelInfo

    out = [ModelInfo("general", "the base", str(base))] if with_base else []
    return out + [ModelInfo(f"lora{k}", f"adapter {k}", str(base), adapter=str(a)) for k, a in enumerate(adapters)]


# ---------------------------------------------------------------------------------------------- memory
def child_memory(args: argparse.Namespace) -> None:
    """In a fresh process: resident memory after imports, then after loading the ensemble (or one member). On a
    GPU "resident" is the device memory PyTorch has allocated (the weights live there, not in the process)."""
    import psutil

    from salm.ensemble import MultiModelWithScalarHeads

    proc = psutil.Process()
    spec = json.loads(args.child_spec)
    device = spec.get("device", "cpu")
    on_gpu = torch.device(device).type == "cuda"

    def resident() -> int:
        if on_gpu:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return proc.memory_info().rss

    before = resident()
    base, adapters = Path(spec["base"]), [Path(a) for a in spec["adapters"]]
    members = infos(base, adapters)
    if spec["case"] in ("base", "peft"):  # the base alone as a plain model; PEFT's model of the base + adapters
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, spec["dtype"])).to(device)
        module = model
        if spec["case"] == "peft":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="lora0")
            for k, a in enumerate(adapters[1:], 1):
                model.load_adapter(str(a), adapter_name=f"lora{k}")
            model.to(device)
    else:
        model = MultiModelWithScalarHeads(members, device=device, dtype=spec["dtype"], router="aware")
        module = model.members[0]
    with torch.no_grad():  # read every page of every weight (memory-mapped files count once read), nothing else
        for p in list(module.parameters()) + list(model.parameters()):
            p.reshape(-1)[::512].float().sum()
    rss = resident()
    print(json.dumps({"rss_after_import": before, "rss_loaded": rss, "weight_bytes": common.weight_bytes(module)}))


def memory(args: argparse.Namespace, base: Path, adapters: list[Path]) -> dict[str, Any]:
    out = {}
    for case in ("base", "peft", "ensemble"):
        spec = json.dumps(
            {
                "case": case,
                "base": str(base),
                "adapters": [str(a) for a in adapters],
                "dtype": args.dtype,
                "device": args.device,
            }
        )
        cmd = [sys.executable, __file__, "--child_spec", spec]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=common.ROOT)
        out[case] = json.loads(res.stdout.strip().splitlines()[-1])
    base_net = out["base"]["rss_loaded"] - out["base"]["rss_after_import"]
    ens_net = out["ensemble"]["rss_loaded"] - out["ensemble"]["rss_after_import"]
    needed = out["ensemble"]["weight_bytes"]  # the shared module: the base + every adapter's LoRA matrices
    members = len(adapters) + 1
    return {
        "base_weight_bytes": out["base"]["weight_bytes"],
        "base_plus_adapters_weight_bytes": needed,
        "base_net_rss_bytes": base_net,
        "ensemble_net_rss_bytes": ens_net,
        "ensemble_over_base_plus_adapters": ens_net / needed,
        "ensemble_over_base_net_rss": ens_net / base_net,
        "peft_net_rss_bytes": out["peft"]["rss_loaded"] - out["peft"]["rss_after_import"],
        # the same base and adapters held by PEFT's own model (what a user would load to have all of them)
        "ensemble_over_peft_net_rss": ens_net / (out["peft"]["rss_loaded"] - out["peft"]["rss_after_import"]),
        # what the adapters add beyond their own weights: 1.0 means the ensemble holds the base once plus the adapters
        "ensemble_over_base_rss_plus_adapters": ens_net / (base_net + needed - out["base"]["weight_bytes"]),
        "separate_merged_members_weight_bytes": members * out["base"]["weight_bytes"],
        "target_ensemble_over_base_plus_adapters": TARGET_MEMORY_RATIO,
        "raw": out,
    }


# ---------------------------------------------------------------------------------------------- speed
def gen_job(ens: Any, prompt: str, new: int, **kw: Any):
    def fn() -> Any:
        out = ens.generate(prompt, max_new_tokens=new, temperature=0.0, return_outputs=True, **kw)
        assert len(out.token_ids) == new, len(out.token_ids)
        return out

    return fn


def peft_job(model: Any, ids: torch.Tensor, names: list[str], new: int, pad: int):
    def fn() -> Any:
        with torch.no_grad():
            return model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, max_new_tokens=new,
                min_new_tokens=new, do_sample=False, pad_token_id=pad,
            )  # fmt: skip

    return fn


def speed(args: argparse.Namespace, base: Path, adapters: list[Path]) -> dict[str, Any]:
    from salm.ensemble import MultiModelWithScalarHeads

    torch.manual_seed(0)
    dev = args.device
    four = MultiModelWithScalarHeads(infos(base, adapters), device=dev, dtype=args.dtype, router="aware").eval()
    three = MultiModelWithScalarHeads(  # the same loaded base and adapters, without the base as a member
        infos(base, adapters, with_base=False), members=four.members[1:], tokenizer=four.tokenizer, device=dev,
        router="aware",
    ).eval()  # fmt: skip
    apart = MultiModelWithScalarHeads(four.infos, members=four.members, tokenizer=four.tokenizer, device=dev,
                                      router="aware").eval()  # fmt: skip
    apart.load_state_dict(four.state_dict())
    apart.run_groups = lambda run: [(i,) for i in run]
    for e in (four, three, apart):
        e.eos_token_ids = set()  # every job decodes exactly the tokens asked for
    prompt = common.fixed_length_prompts(four.tokenizer, 1, args.prompt_tokens)[0][0]
    cases = {
        "base": (four, {"routing": "member:general"}),
        "routed3": (three, {}),
        "routed4": (four, {}),
        "apart4": (apart, {}),
    }
    if args.compile:  # one CUDA graph per step on a GPU: the launches that bound an eager batch-1 step go away
        cases["base_compiled"] = (four, {"routing": "member:general", "compile": True})
        cases["routed3_compiled"] = (three, {"compile": True})
    if args.cases:
        keep = {*args.cases.split(","), "base", "base_compiled"}  # the baselines of the ratios
        cases = {k: v for k, v in cases.items() if k in keep}
    jobs: dict[int, dict[str, Any]] = {1: {}}
    for name, (ens, kw) in cases.items():
        jobs[1][f"{name}@1"] = gen_job(ens, prompt, 1, **kw)
        jobs[1][f"{name}@{args.new_tokens}"] = gen_job(ens, prompt, args.new_tokens, **kw)
    if args.peft_reference:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, args.dtype)).to(dev)
        ref = PeftModel.from_pretrained(ref, str(adapters[0]), adapter_name="lora0")
        for k, a in enumerate(adapters[1:], 1):
            ref.load_adapter(str(a), adapter_name=f"lora{k}")
        ref.to(dev).eval()
        ids = four.tokenizer(prompt, return_tensors="pt")["input_ids"].repeat(len(adapters), 1).to(dev)
        names = [f"lora{k}" for k in range(len(adapters))]
        pad = four.tokenizer.pad_token_id
        jobs[1]["peft_mixed@1"] = peft_job(ref, ids, names, 1, pad)
        jobs[1][f"peft_mixed@{args.new_tokens}"] = peft_job(ref, ids, names, args.new_tokens, pad)
    for fn in jobs[1].values():  # warm-up
        fn()
    times: dict[int, dict[str, list[float]]] = {1: {k: [] for k in jobs[1]}}
    repeats = [common.run_repeat(r, [1], {1: args.repeats}, jobs, times, dev) for r in range(args.repeats)]
    steps = {}
    for name in {k.split("@")[0] for k in jobs[1]}:
        long, short = times[1][f"{name}@{args.new_tokens}"], times[1][f"{name}@1"]
        per_step = [(a - b) / (args.new_tokens - 1) for a, b in zip(long, short)]
        steps[name] = {"per_step_s": common.summary(per_step), "median_per_step_s": common.median(per_step)}
    b = steps["base"]["median_per_step_s"]
    ratios = {f"{k}_over_base": v["median_per_step_s"] / b for k, v in steps.items() if k != "base"}
    if "base_compiled" in steps:  # compiled against compiled: the grouped adapters' own cost in a graph
        bc = steps["base_compiled"]["median_per_step_s"]
        ratios["routed3_compiled_over_base_compiled"] = steps["routed3_compiled"]["median_per_step_s"] / bc
    return {"steps": steps, "ratios": ratios, "repeats": repeats, "target_routed3_over_base": TARGET_STEP_RATIO}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=None, help="an HF folder (default: random Qwen2.5-0.5B architecture)")
    p.add_argument("--quick", action="store_true", help="2-layer random base")
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--dtype", default=None, help="members' dtype (default: bfloat16 where the CPU has it, else float32)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (memory on a GPU: PyTorch's allocated bytes)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=13)
    p.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=32)
    p.add_argument("--peft_reference", action="store_true", help="also time PEFT's own mixed batch")
    p.add_argument("--compile", action="store_true", help="also time base and routed3 with compile=True")
    p.add_argument("--cases", default=None, help="comma list of decode cases to time (base always)")
    p.add_argument("--keep", default=None, help="build base/adapters into this folder and keep them")
    p.add_argument("--only", choices=["memory", "speed"], default=None, help="one part (merged into --out)")
    p.add_argument("--out", default=None)
    p.add_argument("--child_spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_spec:
        child_memory(args)
        return 0
    gpu = torch.device(args.device).type == "cuda"
    if args.dtype is None:
        args.dtype = "bfloat16" if gpu or torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    default = common.RESULTS / ("adapters_gpu.json" if gpu else "adapters_cpu.json")
    out = args.out or str(Path(tempfile.gettempdir()) / "salm_adapters_quick.json" if args.quick else default)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="salm_bench_adapters_"))
    t0 = time.perf_counter()
    try:
        base, adapters = build(root, args.base, args.quick, args.rank, args.adapters)
        old = json.loads(Path(out).read_text()) if args.only and Path(out).is_file() else {}
        mem, spd = old.get("memory"), old.get("decode")
        if args.only != "speed":
            common.log("memory")
            mem = memory(args, base, adapters)
            common.log(f"memory: ensemble {mem['ensemble_over_base_plus_adapters']:.2f} x (base + adapters)")
        if args.only != "memory":
            common.log("decode steps")
            spd = speed(args, base, adapters)
            common.log("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in spd["ratios"].items()))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result = {
        "benchmark": "adapters",
        "quick": bool(args.quick),
        "base": args.base or "random Qwen2.5-0.5B architecture",
        "settings": {k: v for k, v in vars(args).items() if k not in ("child_spec",)},
        "environment": common.environment(args.device),
        "memory": mem,
        "decode": spd,
        "met": {
            "memory": None if mem is None else mem["ensemble_over_base_plus_adapters"] <= TARGET_MEMORY_RATIO,
            "routed3_step": None if spd is None else spd["ratios"].get("routed3_over_base", 9e9) <= TARGET_STEP_RATIO,
        },
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    common.write_json(out, result)
    common.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
