"""Peak resident memory of loading + generating with an ensemble, against the members' weight bytes.

Members with the real Qwen2.5-0.5B architecture (random weights, ``--quick``: 2 layers) are saved as ordinary
Hugging Face folders, then every measurement runs in a fresh subprocess (so peaks never mix) that loads
through saLM's own loading path and generates. The parent samples the child's RSS with psutil; the child
also reports its kernel high-water mark (VmHWM), and the larger of the two is the peak.

    python benchmarks/bench_memory.py            # writes benchmarks/results/memory.json
    python benchmarks/bench_memory.py --quick
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

MiB = 2**20


# ---------------------------------------------------------------------------------------------- child
def _status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process in bytes (Linux), ru_maxrss elsewhere."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(val.split()[0]) * 1024
    except OSError:
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def child(args: argparse.Namespace) -> None:
    import torch

    import salm.ensemble
    import salm.generation
    from salm.members import ModelInfo, load_member_model, load_tokenizer

    torch.set_num_threads(common.core_count())
    phases: dict[str, Any] = {"imported": _status()}
    infos = [ModelInfo(f"m{i}", f"m{i}", str(Path(args.dir) / f"m{i}")) for i in range(args.n)]
    tok = load_tokenizer(infos[0])
    texts, ids = common.fixed_length_prompts(tok, args.batch, args.prompt_tokens, seed=0)
    if args.child == "member":
        model = load_member_model(infos[0], "cpu", torch.float32)
        model.generation_config.eos_token_id = None
        phases["loaded"] = _status()
        ids_t = torch.tensor(ids)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids_t,
                attention_mask=torch.ones_like(ids_t),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        assert out.shape[1] == args.prompt_tokens + args.new_tokens
        weights = common.weight_bytes(model)
    else:
        ens = salm.ensemble.MultiModelWithScalarHeads(infos, device="cpu", dtype=torch.float32)
        ens.eos_token_ids = set()
        phases["loaded"] = _status()
        outs = salm.generation.generate(ens, texts, max_new_tokens=args.new_tokens, temperature=0.0)
        assert len(outs) == args.batch
        weights = sum(common.weight_bytes(m) for m in ens.members)
    phases["generated"] = _status()
    print(json.dumps({"phases": phases, "weight_bytes": weights}))


# ---------------------------------------------------------------------------------------------- parent
def build_members(root: Path, n: int, layers: int | None) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = common.bench_tokenizer()
    cfg = common.qwen_config("qwen2.5-0.5b", tok, layers)
    per_member = 0
    for i in range(n):
        t0 = time.perf_counter()
        m = common.build_random_member(cfg, seed=2000 + i, dtype=torch.float32)
        m.save_pretrained(root / f"m{i}")
        tok.save_pretrained(root / f"m{i}")
        per_member = common.weight_bytes(m)
        del m
        common.log(f"member {i} saved in {time.perf_counter() - t0:.1f}s")
    return per_member


def measure(args: argparse.Namespace, mode: str, n: int, root: Path) -> dict[str, Any]:
    """Run one child; sample its RSS every 5 ms with psutil while it loads and generates."""
    import psutil

    cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--dir", str(root)]
    cmd += ["--batch", str(args.batch), "--prompt-tokens", str(args.prompt_tokens)]
    cmd += ["--new-tokens", str(args.new_tokens)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    ps = psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], ps.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} N={n} failed:\n{stderr[-3000:]}")
    data = json.loads(stdout.strip().splitlines()[-1])
    phases = data["phases"]
    hwm = max(p.get("VmHWM", 0) for p in phases.values())
    return {
        "mode": mode,
        "n_members": n,
        "weight_bytes": data["weight_bytes"],
        "peak_rss_bytes": max(hwm, peak[0]),
        "peak_rss_psutil_sampled_bytes": peak[0],
        "peak_rss_vmhwm_bytes": hwm,
        "rss_after_import_bytes": phases["imported"]["VmRSS"],
        "peak_after_load_bytes": phases["loaded"]["VmHWM"],
        "rss_after_load": {k: phases["loaded"][k] for k in ("VmRSS", "RssAnon", "RssFile") if k in phases["loaded"]},
        "rss_after_generate": {
            k: phases["generated"][k] for k in ("VmRSS", "RssAnon", "RssFile") if k in phases["generated"]
        },
        "wall_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2-layer members")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/memory.json; --quick: temp)")
    p.add_argument("--members", type=int, nargs="+", default=[2, 3])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--keep", default=None, help="build the members into this folder and keep them")
    p.add_argument("--child", choices=["member", "ensemble"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    quick_out = Path(tempfile.gettempdir()) / "salm_memory_quick.json"
    out = args.out or str(quick_out if args.quick else common.RESULTS / "memory.json")
    t_start = time.perf_counter()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="salm_bench_memory_"))
    try:
        per_member = build_members(root, max(args.members), 2 if args.quick else None)
        runs = []
        for mode, n in [("member", 1)] + [("ensemble", n) for n in args.members]:
            r = measure(args, mode, n, root)
            common.log(f"{mode} N={n}: peak RSS {r['peak_rss_bytes'] / MiB:.0f} MiB ({r['wall_s']:.0f}s)")
            runs.append(r)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    single = runs[0]
    base = single["rss_after_import_bytes"]
    single_net = single["peak_rss_bytes"] - base
    for r in runs:
        net = r["peak_rss_bytes"] - r["rss_after_import_bytes"]
        r["peak_over_weight_bytes"] = r["peak_rss_bytes"] / r["weight_bytes"]
        r["net_peak_over_weight_bytes"] = net / r["weight_bytes"]
        r["net_peak_over_n_single_members"] = net / (r["n_members"] * single_net)
    result = {
        "benchmark": "memory",
        "quick": bool(args.quick),
        "environment": common.environment("cpu"),
        "setup": {
            "architecture": "qwen2.5-0.5b",
            "layers": 2 if args.quick else common.ARCHS["qwen2.5-0.5b"]["num_hidden_layers"],
            "dtype": "float32",
            "device": "cpu",
            "weight_bytes_per_member": per_member,
            "load_path": "members saved as HF folders (safetensors), loaded by salm (load_member_model / "
            "MultiModelWithScalarHeads(infos)); single member: its own HF generate",
            "batch_size": args.batch,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "definitions": {
                "peak_rss_bytes": "max(psutil RSS sampled every 5 ms by the parent, the child's VmHWM)",
                "net": "peak RSS minus the child's RSS after importing torch/transformers/salm",
                "net_peak_over_n_single_members": "net ensemble peak / (N x net peak of one member alone)",
            },
        },
        "interpreter_rss_after_import_bytes": base,
        "results": runs,
        "runtime_s": time.perf_counter() - t_start,
    }
    path = common.write_json(out, result)
    for r in runs:
        print(
            f"{r['mode']} N={r['n_members']}: peak {r['peak_rss_bytes'] / MiB:.0f} MiB, weights "
            f"{r['weight_bytes'] / MiB:.0f} MiB, peak/weights {r['peak_over_weight_bytes']:.2f}, "
            f"net/weights {r['net_peak_over_weight_bytes']:.2f}, "
            f"net/(N x single) {r['net_peak_over_n_single_members']:.2f}"
        )
    common.log(f"wrote {path} in {result['runtime_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
