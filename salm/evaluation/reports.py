"""Human-facing outputs of an evaluation run: plots, the markdown report and the coloured examples page.

Everything here reads the summary dict that :func:`salm.evaluation.runner.evaluate` builds, so a report
can be re-rendered from ``evaluation_summary.json`` alone. Members keep one colour everywhere
(:func:`salm.display.member_colour`); the ensemble is dark grey and the oracle light grey.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from salm.display import member_colour
from salm.io import atomic_write_text
from salm.plotting import figure, save_png

__all__ = ["example_item", "render_report", "write_examples_html", "write_plots"]

ENSEMBLE_COLOUR = "#333333"
ROUTED_COLOUR = "#777777"
ORACLE_COLOUR = "#bbbbbb"


def _colour(name: str, members: Sequence[str]) -> str:
    return member_colour(members, name) if name in members else ENSEMBLE_COLOUR


def _subplots(width: float, height: float) -> tuple[Any, Any]:
    fig = figure(width, height)
    return fig, fig.add_subplot()


def _save(fig: Any, path: Path) -> None:
    save_png(fig, path, bbox_inches="tight")


def write_plots(summary: Mapping[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Accuracy with Wilson error bars, routing shares and teacher-forced NLLs; returns {plot: file name}."""
    out = Path(out_dir)
    members = list(summary["settings"]["members"])
    datasets = summary["datasets"]
    written: dict[str, str] = {}

    # Accuracy per model and dataset, with 95% Wilson intervals and the chance level.
    acc_sets = [d for d, r in datasets.items() if any("accuracy" in e for e in r["models"].values())]
    if acc_sets:
        models = list(summary["models"])
        fig, ax = _subplots(max(5.0, 1.6 * len(acc_sets) * len(models) / 2), 4)
        width = 0.8 / len(models)
        for j, name in enumerate(models):
            xs, ys, lo, hi = [], [], [], []
            for i, d in enumerate(acc_sets):
                e = datasets[d]["models"].get(name, {})
                if "accuracy" not in e:
                    continue
                xs.append(i + (j - (len(models) - 1) / 2) * width)
                ys.append(e["accuracy"])
                lo.append(e["accuracy"] - e["ci_low"])
                hi.append(e["ci_high"] - e["accuracy"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=name, color=_colour(name, members))
        # Chance above 0 is a dashed line over the dataset's bars (drawn above them, so bars cannot hide it);
        # chance 0 (free-form answers) would sit on the axis unseen, so it is written under the name instead.
        chance_drawn = False
        for i, d in enumerate(acc_sets):
            base = datasets[d].get("random_baseline")
            if base:
                ax.hlines(base, i - 0.45, i + 0.45, colors="k", linestyles="dashed", linewidth=1.5, zorder=5,
                          label=None if chance_drawn else "chance")  # fmt: skip
                chance_drawn = True
        labels = []
        for d in acc_sets:
            base = datasets[d].get("random_baseline")
            label = f"{d}\n({datasets[d]['models'][models[0]].get('primary', '')})"
            labels.append(label + ("\nchance 0" if base == 0 else ""))
        ax.set_xticks(range(len(acc_sets)), labels)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (95% Wilson CI)" + ("; dashed: chance" if chance_drawn else ""))
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title("Accuracy per model")
        _save(fig, out / "accuracy.png")
        written["accuracy"] = "accuracy.png"

    # Share of generated tokens per member (ensemble generation).
    share_sets = [d for d, r in datasets.items() if r.get("decision_patterns", {}).get("tokens")]
    if share_sets:
        fig, ax = _subplots(6, 0.6 * len(share_sets) + 1.5)
        left = [0.0] * len(share_sets)
        for m in members:
            vals = [datasets[d]["decision_patterns"]["share"].get(m, 0.0) for d in share_sets]
            ax.barh(share_sets, vals, left=left, color=member_colour(members, m), label=m)
            left = [a + b for a, b in zip(left, vals)]
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of generated tokens")
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title("Who emits the ensemble's tokens")
        _save(fig, out / "routing_share.png")
        written["routing_share"] = "routing_share.png"

    # Teacher-forced NLL per gold token: members, ensemble mixture, argmax routing, oracle.
    nll_sets = [d for d, r in datasets.items() if (r.get("teacher_forced") or {}).get("tokens")]
    if nll_sets:
        bars = [*members, "ensemble", "argmax routing", "oracle"]
        colours = [member_colour(members, m) for m in members] + [ENSEMBLE_COLOUR, ROUTED_COLOUR, ORACLE_COLOUR]
        fig, ax = _subplots(max(5.0, 1.4 * len(nll_sets) * len(bars) / 3), 4)
        width = 0.8 / len(bars)
        for j, (name, colour) in enumerate(zip(bars, colours)):
            ys = []
            for d in nll_sets:
                tf = datasets[d]["teacher_forced"]
                key = {"ensemble": "ensemble_nll", "argmax routing": "routed_nll", "oracle": "oracle_nll"}.get(name)
                ys.append(tf[key] if key else tf["member_nll"].get(name, 0.0))
            xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(nll_sets))]
            ax.bar(xs, ys, width, label=name, color=colour)
        ax.set_xticks(range(len(nll_sets)), nll_sets)
        ax.set_ylabel("NLL per gold answer token (nats)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title("Teacher-forced NLL on gold answers")
        _save(fig, out / "nll.png")
        written["nll"] = "nll.png"
    return written


# ----------------------------------------------------------------------------------------------------
# Examples page
# ----------------------------------------------------------------------------------------------------


# C0 control characters (a random or byte-level model emits them) are shown as their visible "control
# pictures" (U+2400...) so the page stays valid HTML; tabs and newlines are kept.
_CONTROL_PICTURES = {c: 0x2400 + c for c in range(32) if chr(c) not in "\t\n"} | {0x7F: 0x2421}


def _visible(text: str) -> str:
    return html.escape(str(text).translate(_CONTROL_PICTURES))


def example_item(dataset: str, example: Any, score: Mapping[str, Any], decisions: Sequence[Any]) -> dict[str, Any]:
    """One entry of the examples page: the example, its score (empty when free text is not scored), the gold
    continuation (what the model should have written) and the generated tokens' decisions."""
    return {
        "dataset": dataset,
        "id": example.id,
        "question": example.question,
        "reference": example.answer,
        "gold": score.get("gold"),
        "answer": score.get("answer"),
        "correct": score.get("correct"),
        "tokens": [(d.token, d.member, d.routing_probs) for d in decisions],
    }


def write_examples_html(items: Sequence[Mapping[str, Any]], model_ids: Sequence[str], path: str | Path) -> Path:
    """One page: each generated token on a background of its member's colour, routing probabilities on hover.

    ``items`` hold ``dataset, id, question, gold, answer, correct`` and ``tokens`` as
    (text, member, {member: probability}) triples, and optionally ``reference`` (the gold continuation,
    shown for every item: for free text such as code or prose it is the only thing to compare against).
    Every piece of model or dataset text is escaped.
    """
    e = _visible
    legend = " ".join(
        f'<span class="key" style="background:{member_colour(model_ids, m)}">{e(m)}</span>' for m in model_ids
    )
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>saLM: routed generations</title><style>',
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.4}",
        ".gen{white-space:pre-wrap;font-family:ui-monospace,monospace;border:1px solid #ccc;padding:.6rem}",
        ".tok{border-bottom:3px solid;border-radius:2px}",
        ".key{color:#fff;padding:.1rem .5rem;margin-right:.4rem;border-radius:3px}",
        "pre{white-space:pre-wrap}.ok{color:#2a7d2a}.bad{color:#b22}",
        "</style></head><body>",
        "<h1>Routed generations</h1>",
        f"<p>Each token is coloured by the member that emitted it; hover for the routing probabilities.</p>"
        f'<p class="legend">{legend}</p>',
    ]
    for it in items:
        verdict = '<span class="ok">correct</span>' if it.get("correct") else '<span class="bad">wrong</span>'
        if it.get("correct") is None:  # free text (code, prose): nothing to score
            verdict = "not scored"
        spans = []
        for text, member, probs in it["tokens"]:
            colour = member_colour(model_ids, member) if member in model_ids else "#000000"
            title = f"{member}\n" + "\n".join(f"{m}: {p:.3f}" for m, p in probs.items())
            spans.append(
                f'<span class="tok" style="background:{colour}33;border-color:{colour}" '
                f'title="{e(title)}">{e(text)}</span>'
            )
        parts += [
            f"<h2>{e(str(it['dataset']))} &middot; {e(str(it['id']))}</h2>",
            f"<details><summary>question</summary><pre>{e(str(it['question']))}</pre></details>",
        ]
        if it.get("correct") is None:  # free text: the gold continuation, open, to read beside the output
            if it.get("reference") is not None:
                parts.append(f"<details open><summary>gold continuation</summary><pre>{e(str(it['reference']))}</pre>")
                parts.append("</details>")
            parts.append(f"<p>{verdict} (free text)</p>")
        else:
            if it.get("reference") is not None:
                parts.append(f"<details><summary>gold answer</summary><pre>{e(str(it['reference']))}</pre></details>")
            parts.append(
                f"<p>gold: <b>{e(str(it.get('gold')))}</b> &middot; extracted: <b>{e(str(it.get('answer')))}</b>"
                f" &middot; {verdict}</p>"
            )
        parts.append(f'<div class="gen">{"".join(spans) or "<i>(empty output)</i>"}</div>')
    parts.append("</body></html>\n")
    return atomic_write_text(path, "\n".join(parts))


# ----------------------------------------------------------------------------------------------------
# Markdown report
# ----------------------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return lines + [""]


def render_report(summary: Mapping[str, Any]) -> str:
    """The run as markdown: settings, accuracy tables, loglik, routing patterns, teacher-forced NLLs, plots."""
    lines = ["# saLM evaluation report", ""] + _settings_section(summary["settings"])
    for name, r in summary["datasets"].items():
        lines += _dataset_section(name, r)
    if summary.get("skipped"):
        lines += ["## Skipped datasets", ""] + [f"- {m}" for m in summary["skipped"].values()] + [""]
    plots = summary.get("plots") or {}
    if plots:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    if summary.get("examples_html"):
        lines += [f"Coloured example generations: [{summary['examples_html']}]({summary['examples_html']})", ""]
    return "\n".join(lines)


_SETTING_KEYS = (
    "members",
    "weights",
    "heads",
    "sample_size",
    "random_seed",
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "routing",
    "batch_size",
    "choice_mode",
    "split",
)


def _settings_section(s: Mapping[str, Any]) -> list[str]:
    """The untrained-heads warning, the settings table and how the comparison is kept fair."""
    lines = []
    if not s.get("weights"):
        lines += [
            "> **Untrained routing heads** (no `--weights`): the ensemble's numbers are not meaningful.",
            "",
        ]
    rows = [[k, ", ".join(s[k]) if isinstance(s[k], list) else s[k]] for k in _SETTING_KEYS]
    lines += _table(["setting", "value"], rows)
    return lines + [
        "Every member is run through the ensemble's own generation code with `routing=member:<id>`: same",
        "prompts, batches, decoding settings, seed and stopping rules. GSM8K's accuracy is strict match",
        "(the stated answer); flexible (last number) is shown beside it. Log-likelihood scores of the",
        "ensemble use the router-weighted mixture of the members' token probabilities.",
        "",
    ]


def _dataset_section(name: str, r: Mapping[str, Any]) -> list[str]:
    """One dataset: baselines, the generative and log-likelihood tables, the ensemble against the best member,
    routing in generation, teacher-forced NLLs and links to its files."""
    lines = [f"## {name} (n={r['n']})", ""]
    base = [f"chance {_f(r.get('random_baseline'))}"] if r.get("random_baseline") is not None else []
    if r.get("majority_baseline") is not None:
        base.append(f"majority class {_f(r['majority_baseline'])}")
    if base:
        lines += ["Baselines: " + ", ".join(base) + ".", ""]
    lines += _generative_table(r) + _loglik_table(r)
    for mode, imp in (r.get("improvement_over_best") or {}).items():
        lines += [
            f"Ensemble vs best member ({mode}): {imp['best_member']} at {_f(imp['best_member_accuracy'])}, "
            f"delta {imp['delta']:+.3f}.",
            "",
        ]
    dp = r.get("decision_patterns") or {}
    if dp.get("tokens"):
        shares = ", ".join(f"{m} {v:.1%}" for m, v in dp["share"].items())
        lines += [
            f"Routing in generation ({dp['tokens']} tokens): {shares}; "
            f"{dp['switches_per_100_tokens']:.1f} switches per 100 tokens; "
            f"mean same-member run {dp['run_length']['mean']:.1f} tokens (max {dp['run_length']['max']}).",
            "",
        ]
    lines += _teacher_forced_section(r.get("teacher_forced") or {})
    return lines + [
        f"Files: [{name}/results.json]({name}/results.json), [{name}/predictions.jsonl]({name}/predictions.jsonl)",
        "",
    ]


def _generative_table(r: Mapping[str, Any]) -> list[str]:
    gen = {m: e["generative"] for m, e in r["models"].items() if "generative" in e}
    if not gen:
        return []
    extra = [k for k in next(iter(gen.values()))["metrics"] if k != "accuracy"]
    rows = [
        [
            m,
            g["accuracy"],
            f"[{g['ci_low']:.3f}, {g['ci_high']:.3f}]",
            g["detection_rate"],
            *[g["metrics"][k]["accuracy"] for k in extra],
            g["mean_generated_tokens"],
        ]
        for m, g in gen.items()
    ]
    return ["Generative:", ""] + _table(["model", "accuracy", "95% CI", "detection", *extra, "tokens/answer"], rows)


def _loglik_table(r: Mapping[str, Any]) -> list[str]:
    ll = {m: e["loglik"] for m, e in r["models"].items() if e.get("loglik")}
    if not ll:
        return []
    variants = list(next(iter(ll.values())))
    rows = [
        [m, *[v for var in variants for v in (x[var]["acc"]["accuracy"], x[var]["acc_norm"]["accuracy"])]]
        for m, x in ll.items()
    ]
    header = ["model", *[f"{var} {k}" for var in variants for k in ("acc", "acc_norm")]]
    return ["Log-likelihood multiple choice:", ""] + _table(header, rows)


def _teacher_forced_section(tf: Mapping[str, Any]) -> list[str]:
    """NLL per gold token of each member, the mixture, argmax routing, the oracle and the best constant
    mixture; how much of the oracle's gain the router captures."""
    if not tf.get("tokens"):
        return []
    rows = [[m, v] for m, v in tf["member_nll"].items()]
    rows += [
        ["ensemble (mixture)", tf["ensemble_nll"]],
        ["argmax routing", tf["routed_nll"]],
        ["oracle router", tf["oracle_nll"]],
    ]
    const = tf.get("constant_mixture")
    if const:
        weights = ", ".join(f"{m} {w:.2f}" for m, w in const["weights"].items())
        rows.insert(len(tf["member_nll"]), [f"best constant mixture ({weights})", const["nll"]])
    lines = [f"Teacher-forced on the gold answers ({tf['tokens']} tokens), NLL per token:", ""]
    lines += _table(["model", "NLL/token"], rows)
    lines += [
        f"Router agrees with the oracle on {tf['router_agreement']:.1%} of tokens; captured share of "
        f"the oracle's gain over {tf['best_member']}: {_f(tf['captured_share'], 2)}"
        + (f" (best constant mixture, {const['fit']}: {_f(const['captured_share'], 2)})." if const else "."),
        "",
    ]
    if tf.get("router_share"):
        shares = ", ".join(f"{m} {v:.1%}" for m, v in tf["router_share"].items())
        lines += [f"Argmax router's choice on the gold answers' tokens: {shares}.", ""]
    return lines
