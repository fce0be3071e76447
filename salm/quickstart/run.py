"""The whole pipeline, offline on the CPU, on the small embedded default ensemble: :func:`run_quickstart` with
:class:`QuickstartSettings` (``salm quickstart``; its flags live in :mod:`salm.commands.quickstart`).

Every stage is the real one, called as a user would call it: members built (or reused) as ordinary
Hugging Face folders plus a member-set file (:mod:`salm.quickstart.build`), heads trained by
:func:`salm.training.train`, and the ensemble and each member evaluated by
:func:`salm.evaluation.runner.evaluate` on held-out text of each domain (teacher-forced NLL, the oracle
router, where the router sends each domain's tokens) and on generated arithmetic problems (accuracy, the
GSM8K scorer). The output folder then holds ``report.md`` with the checks the quickstart must pass,
``quickstart_summary.json``, the training and evaluation folders, and ``examples.html``.

The specialist domains are ``code`` and ``math`` (their specialists' domain); ``prose`` is where the
general member is best, so its tokens should go to ``general``.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from salm.cpu import compute_record
from salm.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from salm.generation import DecodeConfig
    from salm.training import TrainConfig

# domain -> the member that should win it (the quickstart members are named after their domains)
EXPECTED_MEMBER = {"code": "code", "prose": "general", "math": "math"}
ARITHMETIC = "arithmetic"
TARGETS = {"routing_share": 0.80, "nll_ratio": 1.02, "accuracy_margin": 0.02}
# Checks that a size's members cannot meet by design, with the reason: the tiny members (seconds of
# training) learn the format of an arithmetic answer but not the sums, so every model scores ~0%.
NOT_APPLICABLE = {
    "tiny": {
        "arithmetic>=math-2pts": "tiny members cannot do the arithmetic (every model ~0%)",
        "arithmetic>>others": "tiny members cannot do the arithmetic (every model ~0%)",
    }
}
CHECKS_FAILED = 1  # salm.cli.EXIT_FAILED: the run finished, but a check it must pass did not


@dataclass
class QuickstartSettings:
    """Everything ``salm quickstart`` takes; the defaults are the recorded run in the README."""

    output_dir: str = "salm_quickstart"
    size: str = "default"
    seed: int = 0
    members_dir: str | None = None
    num_epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    entropy_weight: float = 0.0
    loss_on: str = "answer"
    router: str | None = None  # None: salm train's default router (TrainConfig.router)
    routing: str = "argmax"
    arithmetic_problems: int | None = None  # None: the whole math test split
    max_new_tokens: int = 64
    num_examples: int = 3
    plots: bool = True
    progress: bool = True

    def decode_config(self) -> DecodeConfig:
        """Greedy decoding with the run's routing, seed and token budget (evaluation and the examples page)."""
        from salm.generation import DecodeConfig

        return DecodeConfig(max_new_tokens=self.max_new_tokens, temperature=0.0, routing=self.routing, seed=self.seed)

    def train_config(self, members_file: str | Path, output_dir: str | Path, **overrides: Any) -> TrainConfig:
        """Head training on the three domains with the run's settings, on the CPU in fp32; ``overrides`` are
        :meth:`TrainConfig.from_flat` settings on top (the benchmarks' variants: ``router=``, ...)."""
        from salm.quickstart.corpora import DOMAINS
        from salm.training import TrainConfig

        flat = dict(
            datasets=sorted(DOMAINS), output_dir=str(output_dir), num_epochs=self.num_epochs,
            batch_size=self.batch_size, learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
            entropy_weight=self.entropy_weight, seed=self.seed, models=str(members_file), device="cpu",
            dtype="float32", loss_on=self.loss_on, plots=self.plots, progress=self.progress,
            **({"router": self.router} if self.router else {}),
        )  # fmt: skip
        return TrainConfig.from_flat(**{**flat, **overrides})


def run_quickstart(s: QuickstartSettings) -> dict[str, Any]:
    """Build/reuse members, train heads, evaluate, write the report; returns the summary (also as JSON).

    Every stage runs with the recipe's fixed thread count and torch's deterministic algorithms, as the
    member build does, so a run's numbers do not depend on the machine's core count.
    """
    from salm.quickstart.build import deterministic_torch, recipe_for

    with deterministic_torch(recipe_for(s.size, s.seed).torch_threads):
        return _run_quickstart(s)


def _run_quickstart(s: QuickstartSettings) -> dict[str, Any]:
    from salm.data import TrainingData, balance
    from salm.evaluation.runner import EvalSettings, evaluate
    from salm.evaluation.tasks import Task, score_gsm8k_output
    from salm.quickstart.build import build_quickstart_members, say
    from salm.training import BEST_DIR, train

    t0 = time.perf_counter()
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    # 1. members
    t = time.perf_counter()
    art = build_quickstart_members(out_dir=s.members_dir, size=s.size, seed=s.seed, progress=s.progress)
    seconds["members"] = time.perf_counter() - t

    # 2. heads, trained by salm train's own code on the three domains' train/validation files: text no
    #    member trained on (see corpora.split_documents for why)
    t = time.perf_counter()
    train_sets, val_sets = art.examples("train"), art.examples("validation")
    data = TrainingData(
        train=balance(train_sets, s.seed),
        val=balance(val_sets, s.seed),
        report={
            "datasets": {d: {"source": str(art.data_files[d]["train"]), "train": len(v)} for d, v in train_sets.items()}
        },
    )
    cfg = s.train_config(art.members_file, out / "training")
    say(f"training the routing heads ({len(data.train)} train / {len(data.val)} validation examples)", s.progress)
    result = train(cfg, data=data)
    model = result.best_model()
    best = result.output_dir / BEST_DIR
    seconds["training"] = time.perf_counter() - t

    # 3. evaluation: NLL-only tasks for code and prose, arithmetic accuracy on the math test split
    t = time.perf_counter()
    tests = art.examples("test")
    arithmetic = tests["math"][: s.arithmetic_problems] if s.arithmetic_problems else tests["math"]
    tasks = [
        (Task("code", scorer=None, description="held-out Python source: teacher-forced NLL"), tests["code"]),
        (Task("prose", scorer=None, description="held-out English prose: teacher-forced NLL"), tests["prose"]),
        (
            Task(
                ARITHMETIC,
                scorer=score_gsm8k_output,
                metrics={"accuracy": "correct", "flexible_accuracy": "flexible_correct"},
                random_baseline=0.0,
                description="generated multi-step arithmetic word problems, scored as GSM8K (strict)",
            ),
            arithmetic,
        ),
    ]
    eval_settings = EvalSettings(
        sample_size=None,
        random_seed=s.seed,
        decode=s.decode_config(),
        batch_size=16,
        plots=s.plots,
        weights=str(best),
        progress=s.progress,
    )
    say("evaluating the ensemble and each member", s.progress)
    ev = evaluate(model, tasks, out / "evaluation", eval_settings)
    seconds["evaluation"] = time.perf_counter() - t

    # 4. coloured generations for every domain, and where the router sends generated tokens
    t = time.perf_counter()
    generations = _example_generations(model, tests, s)
    seconds["examples"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0

    summary = _summarize(art, result, ev, generations, s, seconds)
    atomic_write_json(out / "quickstart_summary.json", summary)
    atomic_write_text(out / "report.md", render_report(summary))
    return summary


def _example_generations(model: Any, tests: dict[str, list], s: QuickstartSettings) -> dict[str, Any]:
    """Greedy ensemble generations for the first ``num_examples`` test prompts of each domain -> HTML page,
    plus the routing pattern of those generated tokens per domain."""
    from salm.evaluation.analysis import decision_patterns, kept_decisions
    from salm.evaluation.reports import example_item, write_examples_html
    from salm.evaluation.tasks import DEFAULT_STOP, score_gsm8k_output

    items: list[dict[str, Any]] = []
    patterns: dict[str, Any] = {}
    solved: list[str] = []  # arithmetic questions the ensemble answered right: the prompt to suggest
    for domain, examples in tests.items():
        chosen = examples[: s.num_examples]
        if not chosen:
            continue
        outs = model.generate(
            [ex.prompt for ex in chosen], config=s.decode_config().merged(stop=list(DEFAULT_STOP)), return_outputs=True
        )
        members = []
        for ex, o in zip(chosen, outs):
            kept = kept_decisions(o, model.tokenizer)
            score = score_gsm8k_output(o.text, ex) if domain == "math" else {}
            if score.get("correct"):
                solved.append(ex.question)
            members.append([d.member for d in kept])
            items.append(example_item(domain, ex, score, kept))
        patterns[domain] = decision_patterns(members, model.model_ids)
    write_examples_html(items, list(model.model_ids), Path(s.output_dir) / "examples.html")
    question = solved[0] if solved else tests["math"][0].question
    return {"patterns": patterns, "html": "examples.html", "question": question, "question_solved": bool(solved)}


def generate_command(members_file: str | Path, heads: str | Path, question: str, max_new_tokens: int) -> str:
    """A ``salm generate`` command line for the quickstart's members and heads, ready to paste in a shell."""
    args = ["salm", "generate", "--models", str(members_file), "--weights", str(heads), "--temperature", "0",
            "--max_new_tokens", str(max_new_tokens), question]  # fmt: skip
    return " ".join(shlex.quote(a) for a in args)


def _summarize(art: Any, result: Any, ev: dict[str, Any], gen: dict[str, Any], s, seconds) -> dict[str, Any]:
    from salm.evaluation.analysis import combine_teacher_forced

    ds = ev["datasets"]
    domains = {"code": ds["code"], "prose": ds["prose"], "math": ds[ARITHMETIC]}
    tf = {d: r["teacher_forced"] for d, r in domains.items()}
    tf["mixed"] = combine_teacher_forced(tf.values())
    nll: dict[str, Any] = {}
    for d, m in tf.items():
        nll[d] = {
            "members": m["member_nll"],
            "ensemble": m["ensemble_nll"],
            "argmax_routed": m["routed_nll"],
            "oracle": m["oracle_nll"],
            "best_member": m["best_member"],
            "ensemble_over_best": m["ensemble_nll"] / m["best_member_nll"] if m["best_member_nll"] else None,
            "captured_share": m["captured_share"],
            "router_agreement": m["router_agreement"],
            "router_share": m["router_share"],
            "tokens": m["tokens"],
        }
    accuracy = {
        name: {k: e.get(k) for k in ("accuracy", "ci_low", "ci_high", "n", "correct", "detection_rate")}
        for name, e in ds[ARITHMETIC]["models"].items()
    }
    ens = accuracy["ensemble"]["accuracy"]
    others = {m: accuracy[m]["accuracy"] for m in ("general", "code")}
    checks = {
        f"routing_{d}_to_{EXPECTED_MEMBER[d]}>=80%": nll[d]["router_share"][EXPECTED_MEMBER[d]]
        >= TARGETS["routing_share"]
        for d in ("code", "math")
    }
    for d in ("code", "prose", "math"):
        checks[f"nll_{d}<=1.02x_best"] = nll[d]["ensemble_over_best"] <= TARGETS["nll_ratio"]
    checks["nll_mixed<every_member"] = all(nll["mixed"]["ensemble"] < v for v in nll["mixed"]["members"].values())
    checks["arithmetic>=math-2pts"] = ens >= accuracy["math"]["accuracy"] - TARGETS["accuracy_margin"]
    checks["arithmetic>>others"] = all(ens >= v + 0.2 for v in others.values())
    not_applicable = NOT_APPLICABLE.get(s.size, {})
    checks = {k: v for k, v in checks.items() if k not in not_applicable}
    heads = (Path(result.output_dir) / "best_model").resolve()
    return {
        "settings": asdict(s),
        "members": {
            "root": str(art.root),
            "members_file": str(art.members_file),
            "reused": art.reused,
            "recipe_hash": art.recipe_hash,
            "build": {
                m: {k: r[k] for k in ("parameters", "nll", "math_accuracy")} for m, r in art.report["members"].items()
            },
        },
        "training": {
            "output_dir": str(result.output_dir),
            "router": result.model.router,
            "best_epoch": result.best_epoch,
            "best_val_nll": result.best_val_nll,
            "initial_val_nll": result.initial_val_nll,
            "routing_share_val": (result.report or {}).get("routing_share_val", {}).get("best"),
            "feature_cache_reused": {
                k: v.get("reused")
                for k, v in (result.report or {}).get("feature_cache", {}).items()
                if isinstance(v, dict)
            },
        },
        "nll": nll,
        "arithmetic": accuracy,
        "generation_routing": {d: p.get("share") for d, p in gen["patterns"].items()},
        "compute": compute_record(result.model),
        "checks": checks,
        "checks_not_applicable": not_applicable,
        "targets": TARGETS,
        "try": {
            "members_file": str(art.members_file),
            "heads": str(heads),
            "question": gen["question"],
            "question_solved": gen["question_solved"],
            "command": generate_command(art.members_file, heads, gen["question"], s.max_new_tokens),
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "files": {
            "evaluation_report": "evaluation/report.md",
            "training": "training/",
            "examples_html": gen["html"],
        },
    }


CAPTURED_NOTE = (
    "captured = (best member - ensemble) / (best member - oracle), the share of the per-token oracle's gain the "
    "router gets; below 0 the ensemble is behind the best member on that domain (ens/best > 1)"
)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def format_table(summary: dict[str, Any]) -> str:
    """The printed end-of-run table: NLL per domain (members, ensemble, oracle), routing, accuracy, checks."""
    nll = summary["nll"]
    members = list(nll["mixed"]["members"])
    head = f"{'NLL/token':<10}" + "".join(f"{m:>10}" for m in members) + f"{'ensemble':>10}{'oracle':>10}"
    head += f"{'ens/best':>10}{'captured':>10}   router share"
    lines = [head]
    for d, r in nll.items():
        row = f"{d:<10}" + "".join(f"{r['members'][m]:>10.3f}" for m in members)
        row += f"{r['ensemble']:>10.3f}{r['oracle']:>10.3f}{r['ensemble_over_best']:>10.3f}"
        row += f"{_pct(r['captured_share']):>10}   " + " ".join(f"{m} {v:.0%}" for m, v in r["router_share"].items())
        lines.append(row)
    lines.append(CAPTURED_NOTE)
    lines.append("")
    acc = summary["arithmetic"]
    lines.append(
        "arithmetic accuracy: "
        + ", ".join(f"{m} {a['accuracy']:.1%} [{a['ci_low']:.2f}, {a['ci_high']:.2f}]" for m, a in acc.items())
    )
    lines.append("")
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in summary["checks"].items()]
    lines += [f"n/a   {name}: {why}" for name, why in summary.get("checks_not_applicable", {}).items()]
    secs = summary["seconds"]
    reused = "reused" if summary["members"]["reused"] else "built"
    lines.append(
        f"\nmembers {reused} ({secs['members']:.0f}s), heads trained ({secs['training']:.0f}s), "
        f"evaluated ({secs['evaluation']:.0f}s); total {secs['total']:.0f}s"
    )
    return "\n".join(lines)


def render_report(summary: dict[str, Any]) -> str:
    """``report.md``: what ran, the numbers, and whether the quickstart's targets were met."""
    s, m, tr = summary["settings"], summary["members"], summary["training"]
    nll, acc = summary["nll"], summary["arithmetic"]
    members = list(nll["mixed"]["members"])
    lines = [
        "# saLM quickstart report",
        "",
        f"Members ({'reused from' if m['reused'] else 'built into'} `{m['root']}`, recipe `{m['recipe_hash']}`): "
        + ", ".join(f"`{k}` ({v['parameters'] / 1e6:.2f}M parameters)" for k, v in m["build"].items())
        + ". `general` was trained on the mix of code, prose and arithmetic; `code` and `math` are copies of it"
        " trained further on one domain.",
        "",
        f"Heads: the `{tr.get('router', 'seed')}` router, {s['num_epochs']} epochs, batch {s['batch_size']}, "
        f"learning rate {s['learning_rate']}, "
        f"entropy weight {s['entropy_weight']}, loss on {s['loss_on']} tokens; best validation NLL "
        f"{tr['best_val_nll']:.4f} at epoch {tr['best_epoch']} (untrained heads: {tr['initial_val_nll']:.4f}).",
        "",
        "## Held-out NLL per answer token (teacher forced)",
        "",
        "| domain | "
        + " | ".join(members)
        + " | ensemble | argmax-routed | oracle | ensemble / best | captured | router share |",
        "|---" * (len(members) + 7) + "|",
    ]
    for d, r in nll.items():
        share = ", ".join(f"{k} {v:.1%}" for k, v in r["router_share"].items())
        lines.append(
            f"| {d} | "
            + " | ".join(f"{r['members'][k]:.4f}" for k in members)
            + f" | {r['ensemble']:.4f} | {r['argmax_routed']:.4f} | {r['oracle']:.4f} | "
            f"{r['ensemble_over_best']:.4f} | {_pct(r['captured_share'])} | {share} |"
        )
    lines += [
        "",
        "*ensemble* is the router-weighted mixture (what training optimises); *argmax-routed* uses the top-scored"
        " member's distribution per token (what `routing=argmax` generation samples from); *oracle* takes the"
        " best member per token; *captured* = (best member − ensemble) / (best member − oracle), the share of the"
        " oracle's gain the router gets: negative where the ensemble is behind the best member (ensemble / best"
        " above 1), i.e. routing costs more there than it gains; *router share* = where the argmax router sends"
        " the gold answer tokens.",
        "",
        f"## Arithmetic accuracy (greedy, {acc['ensemble']['n']} held-out problems, strict GSM8K scoring)",
        "",
        "| model | accuracy | 95% CI | answer found |",
        "|---|---|---|---|",
    ]
    for name, a in acc.items():
        lines.append(
            f"| {name} | {a['accuracy']:.1%} | [{a['ci_low']:.3f}, {a['ci_high']:.3f}] | {a['detection_rate']:.0%} |"
        )
    gen = summary["generation_routing"]
    lines += ["", "## Routing in generation (ensemble, greedy)", ""]
    lines += [f"- {d}: " + ", ".join(f"{k} {v:.1%}" for k, v in share.items()) for d, share in gen.items() if share]
    lines += ["", "## Checks", ""]
    lines += [f"- {'PASS' if ok else '**FAIL**'} `{name}`" for name, ok in summary["checks"].items()]
    lines += [f"- n/a `{name}`: {why}" for name, why in summary.get("checks_not_applicable", {}).items()]
    secs = summary["seconds"]
    tr_ = summary["try"]
    solved = " (the ensemble answered it correctly above)" if tr_["question_solved"] else ""
    lines += [
        "",
        "## Try it",
        "",
        f"The members file is `{tr_['members_file']}`; every command takes it with `--models`, and the trained"
        f" heads with `--weights`. A held-out arithmetic question{solved}:",
        "",
        "```bash",
        tr_["command"],
        "```",
        "",
        "## Files",
        "",
        "- [examples.html](examples.html): generations, each token coloured by the member that emitted it",
        "- [evaluation/report.md](evaluation/report.md): the evaluation run (results.json, predictions.jsonl, plots)",
        "- [training/](training/): heads (`best_model/`, `best_model_heads.pt`), metrics.jsonl, loss and routing plots",
        "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()),
        "",
    ]
    return "\n".join(lines)
