"""``salm serve`` under load: 1, 2, 3, 4 and 16 concurrent streaming clients, against offline ``generate`` batch 16.

The quickstart's tiny members (built on the CPU in seconds, cached), or the members of ``--models FILE``
(real ones: the CPU's kernels then decide how a batch of 2-3 costs), get fresh heads (speed does not depend
on head values). The same ``--requests`` prompts (quickstart test questions in the Question/Answer
template) are generated greedily by every configuration, so every configuration produces exactly the same
tokens -- the run checks that the served texts equal the offline ones -- and tokens/s compare like for like.
For each client count, that many threads send streamed completions back to back until every prompt is
done; we record throughput (completion tokens / wall time), time to first token and p50/p95 request
latency. Offline: ``model.generate(prompts, batch_size=16)`` and one prompt at a time, in this process,
with the server's thread count. Every figure is the median of ``--rounds`` interleaved rounds.
Targets: 3 clients >= 2.5x one client's throughput; 16 clients >= 3x one client's and >= 0.8x offline batch 16.
With ``--models`` the offline runs are skipped (one copy of the members in memory: the server's), and the
served texts are compared across client counts instead.

    python benchmarks/bench_serve.py           # writes benchmarks/results/serve_cpu.json
    python benchmarks/bench_serve.py --models /work/real/members.json --requests 6 --new-tokens 24 \\
        --clients 1 2 3 --out benchmarks/results/serve_cpu_real.json
    python benchmarks/bench_serve.py --quick   # fewer tokens, nothing written unless --out
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET_SCALING = 3.0  # 16 clients vs 1 client
TARGET_SCALING_3 = 2.5  # 3 clients vs 1 client
TARGET_VS_OFFLINE = 0.8  # 16 clients vs offline generate batch 16


def quickstart_prompts(n: int) -> tuple[Path, list[str]]:
    from salm.data import build_prompt
    from salm.quickstart.build import build_quickstart_members

    art = build_quickstart_members(size="tiny", progress=True)
    rows = [json.loads(line) for line in art.data_files["mixed"]["test"].read_text().splitlines() if line.strip()]
    questions = [r.get("question") or r.get("prompt") for r in rows]
    return art.members_file, [build_prompt(q) for q in questions[:n]]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run_clients(url: str, prompts: list[str], clients: int, new_tokens: int) -> dict[str, Any]:
    """``clients`` threads stream completions back to back until every prompt is answered."""
    import httpx

    todo = list(enumerate(prompts))
    lock = threading.Lock()
    results: dict[int, dict[str, Any]] = {}

    # Clients are built (and connected) before the clock starts: building an httpx client costs more CPU
    # than a tiny member's decode step, and would otherwise stagger the "simultaneous" clients.
    pool = [httpx.Client(timeout=600) for _ in range(clients)]
    for c in pool:
        c.get(url + "/health")
    start = threading.Barrier(clients + 1)

    def worker(c: httpx.Client) -> None:
        start.wait()
        with contextlib.closing(c):
            while True:
                with lock:
                    if not todo:
                        return
                    i, prompt = todo.pop(0)
                body = {
                    "model": "salm", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True},
                }  # fmt: skip
                t0 = time.perf_counter()
                ttft, text, tokens = None, [], 0
                with c.stream("POST", url + "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        if chunk["choices"]:
                            ttft = ttft if ttft is not None else time.perf_counter() - t0
                            text.append(chunk["choices"][0]["text"])
                results[i] = {
                    "ttft": ttft,
                    "latency": time.perf_counter() - t0,
                    "tokens": tokens,
                    "text": "".join(text),
                }

    threads = [threading.Thread(target=worker, args=(c,)) for c in pool]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    rs = [results[i] for i in range(len(prompts))]
    lat, ttft = [r["latency"] for r in rs], [r["ttft"] for r in rs]
    tokens = sum(r["tokens"] for r in rs)
    return {
        "clients": clients,
        "requests": len(rs),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_s": {"p50": statistics.median(ttft), "p95": percentile(ttft, 0.95)},
        "latency_s": {"p50": statistics.median(lat), "p95": percentile(lat, 0.95)},
        "texts": [r["text"] for r in rs],
    }


def start_server(weights: Path, port: int, threads: int, log: Path, dtype: str = "auto") -> subprocess.Popen:
    import httpx

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "salm.cli", "serve", "--weights", str(weights), "--device", "cpu"]
    cmd += ["--port", str(port), "--max_batch", "16", "--dtype", dtype]
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, server and offline alike")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats; medians are reported")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 3, 4, 16], help="concurrent clients to time")
    ap.add_argument("--models", default=None, help="member-set file (default: the quickstart's tiny members)")
    ap.add_argument("--dtype", default="auto", help="the members' dtype, server and offline alike")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.rounds = 16, 1
    if 1 not in args.clients:
        ap.error("--clients must include 1 (the baseline)")
    return args


def med(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median throughput (its latencies stay consistent with it)."""
    best = sorted(rs, key=lambda x: x["tokens_per_s"])[len(rs) // 2]
    out = {k: v for k, v in best.items() if k != "texts"}
    out["tokens_per_s_rounds"] = [x["tokens_per_s"] for x in rs]
    return out


def main() -> None:
    args = parse_args()
    import torch

    from salm.ensemble import MultiModelWithScalarHeads

    torch.set_num_threads(args.threads)
    tiny_members, prompts = quickstart_prompts(args.requests)
    members_file = args.models or tiny_members
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    torch.manual_seed(0)
    model = MultiModelWithScalarHeads(members_file, device="cpu", dtype=args.dtype).eval()
    model.save_pretrained(tmp / "heads")
    dtype = str(model.dtype).replace("torch.", "")
    offline_sizes = () if args.models else (16, 1)
    if args.models:  # one copy of real members in memory: the server's
        del model

    def offline(bs: int):
        return model.generate(prompts, max_new_tokens=args.new_tokens, temperature=0, batch_size=bs)

    want = offline(16) if offline_sizes else None  # warm-up, and the texts every configuration must reproduce
    env = common.environment("cpu")
    proc = start_server(tmp / "heads", args.port, args.threads, tmp / "server.log", args.dtype)
    url = f"http://127.0.0.1:{args.port}"
    # Rounds interleave every configuration (the server idles while offline runs), so a change in machine
    # load hits them alike; each figure is the median over rounds.
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        run_clients(url, prompts[:2], 2, 4)  # warm-up
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for bs in offline_sizes:
                wall, _ = common.timed(lambda b=bs: offline(b))
                runs.setdefault(f"offline_batch_{bs}", []).append({"wall_s": wall})
            for c in args.clients[r % len(args.clients) :] + args.clients[: r % len(args.clients)]:
                runs.setdefault(f"clients_{c}", []).append(run_clients(url, prompts, c, args.new_tokens))
    finally:
        proc.terminate()
        proc.wait(30)
    tokens = runs["clients_1"][0]["completion_tokens"]
    for rs in runs.values():
        for x in rs:
            x["tokens_per_s"] = tokens / x["wall_s"]
    served = {c: med(runs[f"clients_{c}"]) for c in args.clients}
    off = {bs: med(runs[f"offline_batch_{bs}"]) for bs in offline_sizes}
    ratios = {f"clients{c}_vs_clients1": served[c]["tokens_per_s"] / served[1]["tokens_per_s"] for c in args.clients}
    if 16 in served and 16 in off:
        ratios["clients16_vs_offline_batch16"] = served[16]["tokens_per_s"] / off[16]["tokens_per_s"]
    texts = [x["texts"] for k, rs in runs.items() if k.startswith("clients") for x in rs]
    targets = {"clients3_vs_clients1": TARGET_SCALING_3, "clients16_vs_clients1": TARGET_SCALING,
               "clients16_vs_offline_batch16": TARGET_VS_OFFLINE}  # fmt: skip
    result = {
        "benchmark": "serve",
        "members": f"{args.models}" if args.models else f"quickstart tiny ({members_file})",
        "settings": {
            "requests": args.requests,
            "new_tokens": args.new_tokens,
            "temperature": 0,
            "threads": args.threads,
            "max_batch": 16,
            "completion_tokens": tokens,
            "rounds": args.rounds,
            "clients": args.clients,
            "dtype": dtype,
        },  # fmt: skip
        "environment": env,
        "served": served,
        "offline_generate": {f"batch_{bs}": v for bs, v in off.items()},
        "texts_match_offline": all(t == want for t in texts) if want is not None else None,
        "texts_match_across_clients": all(t == texts[0] for t in texts),
        "ratios": ratios,
        "targets": {**targets, "met": {k: ratios[k] >= v for k, v in targets.items() if k in ratios}},
    }
    print(json.dumps(result, indent=2))
    out = args.out or (None if args.quick else str(common.RESULTS / "serve_cpu.json"))
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
