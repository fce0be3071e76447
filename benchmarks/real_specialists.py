"""Real specialists: LoRA finetunes of pretrained members, routed token by token, against every member.

The question: does routing frozen specialists beat each of them on *pretrained* networks? Two members of one
family where one dominates leave nothing to route, so we make specialists the way users do, as LoRA adapters of
a general model (``salm finetune``), each knowing what the others do not:

- ``coder-05b``: Qwen2.5-Coder-0.5B-Instruct (``../shared/models``), the general model;
- ``facts-a`` and ``facts-b`` (0.5B + LoRA): two disjoint sets of invented facts (people and their favourite
  colour, pet and city), in the knowledge split's manner: alone, each knows half the fact questions;
- ``gsm8k-05b`` (0.5B + LoRA): worked GSM8K train solutions, a specialist of real task data.

The members file names the adapters on their base, so all four members share one base and run in one batched
forward. (A ``facts-b`` on the 1.5B was planned: on two CPU cores its finetune alone took ~45 s a step, two
hours, and every scored request would have cost three times as much. With a GPU, set its base in SPECIALISTS.)
The routing heads are trained with ``salm train`` (its defaults, and tuned
settings) on data no member was finetuned on: fact questions about *other* people of both sets (each adapter
knows its whole set; the heads must generalise to people they never saw), GSM8K train rows outside the
specialist's, and the first rows of MedQA and BoolQ. Everything is scored with ``salm harness``
(lm-evaluation-harness) on held-out documents: fact questions about test people (multiple choice, 8 values),
BoolQ, MedQA (4 options) and GSM8K (5-shot generation). Reported per task and for the whole suite: accuracy with
95% Wilson intervals for every member and ensemble variant, the best constant mixture of the members
(sequence-level, weights chosen in hindsight on the same questions: an upper bound for any fixed mixture) and
the per-question oracle (a member is right).

Stages (each cached in ``--work``; rerunning skips what exists, so a killed run resumes):

    python benchmarks/real_specialists.py data          # facts, the specialists' data, heads data, eval data
    python benchmarks/real_specialists.py specialists   # salm finetune x 3
    python benchmarks/real_specialists.py heads         # salm train (default, tuned)
    python benchmarks/real_specialists.py harness       # salm harness for every variant
    python benchmarks/real_specialists.py report        # -> benchmarks/results/real_specialists.json
    python benchmarks/real_specialists.py all
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SHARED = common.ROOT.parent / "shared"
ATTRIBUTES: dict[str, tuple[str, tuple[str, ...]]] = {  # attribute -> (question template, 8 values)
    "colour": (
        "What is the favourite colour of {person}?",
        ("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
    ),
    "pet": ("Which pet does {person} keep?", ("cat", "dog", "horse", "rabbit", "parrot", "turtle", "goat", "mouse")),
    "city": (
        "In which city does {person} live?",
        ("Paris", "London", "Rome", "Berlin", "Madrid", "Vienna", "Dublin", "Oslo"),
    ),
}
_FIRST = ("Al", "Bre", "Cor", "Dav", "El", "Fen", "Gal", "Har", "Isa", "Jor", "Kel", "Lin", "Mar", "Nor", "Ose")
_MID = ("a", "e", "i", "o", "u", "ar", "en", "is", "or", "un")
_LAST = ("bry", "dell", "fax", "grove", "holt", "kin", "lund", "mire", "nash", "quist", "rook", "stad", "vane")
ROLES = ("heads_train", "heads_val", "test")


@dataclass(frozen=True)
class Fact:
    person: str
    attribute: str
    value: str
    group: str  # "a" or "b": the specialist that learns it
    role: str  # heads_train, heads_val or test: who may see the question besides the specialist

    @property
    def question(self) -> str:
        return ATTRIBUTES[self.attribute][0].format(person=self.person)

    @property
    def choices(self) -> list[str]:
        return list(ATTRIBUTES[self.attribute][1])


def make_facts(people_per_role: tuple[int, int, int], seed: int = 0) -> list[Fact]:
    """Invented people (first name + surname built from syllables, unique), split into groups a and b and, within
    each, into the roles; every person has one value of every attribute, drawn uniformly."""
    rng = random.Random(f"salm-real-facts-{seed}")
    need = 2 * sum(people_per_role)
    names: list[str] = []
    while len(names) < need:
        name = (rng.choice(_FIRST) + rng.choice(_MID) + rng.choice(_LAST)[:2]).capitalize()
        surname = (rng.choice(_FIRST) + rng.choice(_MID) + rng.choice(_LAST)).capitalize()
        full = f"{name} {surname}"
        if full not in names:
            names.append(full)
    facts = []
    it = iter(names)
    for group in ("a", "b"):
        for role, count in zip(ROLES, people_per_role):
            for _ in range(count):
                person = next(it)
                for attribute, (_, values) in ATTRIBUTES.items():
                    facts.append(Fact(person, attribute, rng.choice(values), group, role))
    return facts


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    from salm.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


FACTS_TASK = """# Invented facts (benchmarks/real_specialists.py): 8-way multiple choice, the prompt saLM trains on.
task: facts_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:\\n"
target_delimiter: ""
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def stage_data(args: argparse.Namespace) -> None:
    """Every data file the later stages read, under ``work/data``; nothing here reads a model."""
    work = Path(args.work)
    data = work / "data"
    facts = make_facts((args.heads_people, args.val_people, args.test_people), args.seed)
    qa = [{"question": f.question, "answer": f.value} for f in facts]
    for group in ("a", "b"):  # a specialist learns every fact of its set, whoever the person's role
        write_jsonl(data / f"facts_{group}_finetune.jsonl", [r for r, f in zip(qa, facts) if f.group == group])
    heads_facts = [r for r, f in zip(qa, facts) if f.role != "test"]
    test_facts = [
        {"question": f.question, "choices": f.choices, "label": f.choices.index(f.value), "group": f.group}
        for f in facts
        if f.role == "test"
    ]
    # The first --eval_facts questions of each set (the facts themselves, hence the adapters, stay the same).
    test_facts = [r for g in ("a", "b") for r in [r for r in test_facts if r["group"] == g][: args.eval_facts // 2]]
    write_jsonl(data / "heads" / "facts.jsonl", heads_facts)
    write_jsonl(data / "eval_facts.jsonl", test_facts)
    tasks = data / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "facts_local.yaml").write_text(FACTS_TASK.format(path=data / "eval_facts.jsonl"), encoding="utf-8")

    src = SHARED / "data"
    gsm_train = read_jsonl(src / "gsm8k" / "train.jsonl")
    medqa = read_jsonl(src / "medqa" / "test_4options.jsonl")
    boolq = read_jsonl(src / "boolq" / "validation.jsonl")
    # The GSM8K specialist's rows, the heads' rows (disjoint from them) and the few-shot pool (the rest).
    write_jsonl(data / "gsm8k_finetune.jsonl", gsm_train[: args.gsm8k_finetune_rows])
    heads_gsm = gsm_train[args.gsm8k_finetune_rows : args.gsm8k_finetune_rows + args.heads_rows]
    write_jsonl(data / "heads" / "gsm8k.jsonl", heads_gsm)
    # MedQA and BoolQ rows as the harness asks them (lm-eval's prompt, a one-token answer): the heads learn to
    # route at the position the harness scores, not inside saLM's own worded answer ("The correct option is").
    write_jsonl(data / "heads" / "medqa.jsonl", [harness_row_medqa(r) for r in medqa[: args.heads_rows]])
    write_jsonl(data / "heads" / "boolq.jsonl", [harness_row_boolq(r) for r in boolq[: args.heads_rows]])
    # The harness's data folder: held-out rows only (the heads' MedQA/BoolQ rows removed), in the layout of
    # ../shared/data, so salm harness --data_dir runs lm-eval's own tasks on them.
    held = data / "harness"
    write_jsonl(held / "medqa" / "test_4options.jsonl", medqa[args.heads_rows :][: args.eval_medqa])
    write_jsonl(held / "boolq" / "validation.jsonl", boolq[args.heads_rows :][: args.eval_boolq])
    write_jsonl(held / "gsm8k" / "test.jsonl", read_jsonl(src / "gsm8k" / "test.jsonl")[: args.eval_gsm8k])
    write_jsonl(held / "gsm8k" / "train.jsonl", gsm_train[args.gsm8k_finetune_rows + args.heads_rows :])
    common.log(
        f"data in {data}: {len(facts)} facts ({len(test_facts)} test questions), heads rows: "
        f"{len(heads_facts)} facts + {args.heads_rows} each of GSM8K, MedQA, BoolQ"
    )


def harness_row_medqa(row: dict[str, Any]) -> dict[str, str]:
    """A MedQA row as ``medqa_4options_local`` asks it (saLM's own converter lists the options A-D the same way;
    the answer is the letter alone)."""
    from salm.data.formats import row_to_example

    example = row_to_example(row, dataset="medqa", split="test", index=0)
    return {"question": example.question, "answer": str(example.label)}


def harness_row_boolq(row: dict[str, Any]) -> dict[str, str]:
    """A BoolQ row as ``boolq_local`` asks it (the passage, the question, yes or no)."""
    answer = "yes" if str(row["answer"]).strip().lower() in ("true", "yes", "1") else "no"
    return {"question": f"{row['passage']}\nQuestion: {row['question']}?", "answer": answer}


SPECIALISTS = {  # id -> (base folder name, finetune data file, salm finetune flags)
    "facts-a": (
        "coder-05b",
        "facts_a_finetune.jsonl",
        ["--learning_rate", "1e-3", "--batch_size", "8", "--max_length", "64", "--loss_on", "all"],
    ),
    "facts-b": (
        "coder-05b",
        "facts_b_finetune.jsonl",
        ["--learning_rate", "1e-3", "--batch_size", "8", "--max_length", "64", "--loss_on", "all"],
    ),
    "gsm8k-05b": (
        "coder-05b",
        "gsm8k_finetune.jsonl",
        ["--learning_rate", "2e-4", "--batch_size", "4", "--max_length", "320"],
    ),
}


def salm(*argv: str, log: Path) -> None:
    """One ``salm`` command, as a user runs it (its output in ``log``); a failure stops the benchmark."""
    import subprocess

    log.parent.mkdir(parents=True, exist_ok=True)
    common.log(f"salm {' '.join(argv)}  (log: {log})")
    with log.open("a", encoding="utf-8") as out:
        code = subprocess.call([sys.executable, "-m", "salm.cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                               cwd=common.ROOT)  # fmt: skip
    if code:
        raise SystemExit(f"salm {argv[0]} failed (exit {code}); see {log}")


def stage_specialists(args: argparse.Namespace) -> None:
    """``salm finetune`` each specialist (resumable: a killed run continues from its last checkpoint)."""
    work, data = Path(args.work), Path(args.work) / "data"
    for mid, (base, file, flags) in SPECIALISTS.items():
        out = work / "specialists" / mid
        if (out / "adapter" / "adapter_config.json").is_file():
            continue
        epochs = str(args.epochs_facts) if mid.startswith("facts") else "1"
        resume = ["--resume"] if (out / "checkpoint").exists() else []
        salm(
            "finetune", "--base", str(Path(args.real) / base), "--data", str(data / file), "--output_dir", str(out),
            "--num_epochs", epochs, "--dtype", args.dtype, "--device", "cpu", "--member_id", mid, *flags, *resume,
            log=work / "logs" / f"finetune-{mid}.log",
        )  # fmt: skip


def members_file(args: argparse.Namespace) -> Path:
    from salm.members import ModelInfo, write_member_set

    work, real = Path(args.work), Path(args.real)

    def adapter(mid: str) -> str:
        return str(work / "specialists" / mid / "adapter")

    members = [
        ModelInfo("coder-05b", "Qwen2.5-Coder-0.5B-Instruct", str(real / "coder-05b")),
        ModelInfo("facts-a", "0.5B + LoRA: fact set a", str(real / "coder-05b"), adapter=adapter("facts-a")),
        ModelInfo("facts-b", "0.5B + LoRA: fact set b", str(real / "coder-05b"), adapter=adapter("facts-b")),
        ModelInfo("gsm8k-05b", "0.5B + LoRA: GSM8K solutions", str(real / "coder-05b"), adapter=adapter("gsm8k-05b")),
    ]
    return write_member_set(work / "members.yaml", members)


HEADS = {  # variant -> salm train flags beyond the data (default: salm train's defaults)
    "default": [],
    # every heads row: by default salm train cuts each dataset to the smallest one's rows (30 of GSM8K, MedQA and
    # BoolQ), which keeps 27 of the 205 fact questions; --balance none keeps them all
    "all": ["--balance", "none"],
    "tuned": ["--balance", "none", "--learning_rate", "3e-3", "--num_epochs", "20", "--warmup_steps", "0"],
    # the statistics and the record alone: heads that cannot memorise the training questions' people
    "evidence": ["--balance", "none", "--router", "evidence"],
    # ... and the loss weighted 5x where the members' argmax tokens differ (where routing decides anything): the
    # GSM8K solutions' thousands of agreed tokens otherwise outweigh the few hundred fact answers
    "focus": ["--balance", "none", "--router", "evidence", "--disagreement_weight", "5"],
}


def stage_heads(args: argparse.Namespace) -> None:
    """``salm train`` the routing heads (every variant shares one feature cache)."""
    work = Path(args.work)
    heads_data = sorted(str(p) for p in (work / "data" / "heads").glob("*.jsonl"))
    for name, flags in HEADS.items():
        out = work / "heads" / name
        if (out / "best_model" / "salm_config.json").is_file():
            continue
        resume = ["--resume"] if (out / "checkpoint_last.pt").is_file() else []
        salm(
            "train", "--models", str(members_file(args)), "--datasets", *heads_data, "--output_dir", str(out),
            "--dtype", args.dtype, "--device", "cpu", "--feature_cache_dir", str(work / "features"), "--max_length",
            "512", *flags, *resume, log=work / "logs" / f"train-{name}.log",
        )  # fmt: skip


SUITES = {"mc": "facts_local,boolq,medqa_4options", "gsm8k": "gsm8k"}
ENSEMBLES = [(heads, routing) for heads in HEADS for routing in ("argmax", "mixture")]
# GSM8K generation is the slow part on a CPU: the default and the variants --gsm8k_variants names
VARIANTS = {"mc": ENSEMBLES, "gsm8k": ENSEMBLES[:1]}


def stage_harness(args: argparse.Namespace) -> None:
    """``salm harness`` per suite: the members once, then every ensemble variant (heads x routing)."""
    work = Path(args.work)
    if not args.pack:  # saLM packs a base this size for oneDNN by default (half the prefill time here)
        os.environ["SALM_CPU_PACK"] = "0"
    variants = dict(VARIANTS)
    if args.gsm8k_variants:
        variants["gsm8k"] = [tuple(v.split("-")) for v in args.gsm8k_variants.split(",")]  # type: ignore[misc]
    common_flags = [
        "--models", str(members_file(args)), "--dtype", args.dtype, "--device", "cpu", "--data_dir",
        str(work / "data" / "harness"), "--include_path", str(work / "data" / "tasks"), "--no_plots",
    ]  # fmt: skip
    for suite, tasks in SUITES.items():
        if suite not in args.suites.split(","):
            continue
        for k, (heads, routing) in enumerate(variants[suite]):
            out = work / "harness" / suite / f"{heads}-{routing}"
            members = [] if k == 0 else ["--only_ensemble"]  # the members once per suite, beside the first ensemble
            if suite == "gsm8k" and args.gsm8k_fewshot is not None:
                members += ["--num_fewshot", str(args.gsm8k_fewshot)]
            salm(
                "harness", "--tasks", tasks, "--weights", str(work / "heads" / heads / "best_model"), "--routing",
                routing, "--output_dir", str(out), *common_flags, *members,
                log=work / "logs" / f"harness-{suite}-{heads}-{routing}.log",
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------- report
MEMBERS = ("coder-05b", "facts-a", "facts-b", "gsm8k-05b")
TASK_NAMES = {"facts_local": "facts", "boolq_local": "boolq", "medqa_4options_local": "medqa", "gsm8k_local": "gsm8k"}


def _samples(folder: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """task -> doc_id -> lm-eval's sample row (GSM8K: the strict-match filter's row)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for f in folder.glob("samples_*.jsonl"):
        task = f.stem.removeprefix("samples_")
        rows = {}
        for r in read_jsonl(f):
            if r.get("filter", "none") in ("none", "strict-match"):
                rows[int(r["doc_id"])] = r
        out[task] = rows
    return out


def _correct(row: dict[str, Any]) -> bool:
    return bool(row.get("acc", row.get("exact_match", 0)))


def _choice_logliks(row: dict[str, Any]) -> list[float]:
    return [float(x[0]) for x in row["filtered_resps"]]


def best_constant_mixture(per_member: dict[str, dict[int, dict[str, Any]]], step: float = 0.1) -> tuple[float, dict]:
    """The constant mixture of the members' choice likelihoods, sum_m w_m p_m(choice), with the weights (a grid on
    the simplex) that score best on these very questions: an upper bound for any fixed mixture."""
    import itertools
    import math

    ids = list(per_member)
    docs = sorted(set.intersection(*(set(v) for v in per_member.values())))
    ll = {m: {d: _choice_logliks(per_member[m][d]) for d in docs} for m in ids}
    gold = {d: int(per_member[ids[0]][d]["target"]) for d in docs}
    n = round(1 / step)
    best, best_w = -1.0, {}
    for parts in itertools.product(range(n + 1), repeat=len(ids) - 1):
        if sum(parts) > n:
            continue
        w = [p / n for p in parts] + [(n - sum(parts)) / n]
        right = 0
        for d in docs:
            scores = [
                math.log(sum(wm * math.exp(ll[m][d][c]) for wm, m in zip(w, ids) if wm > 0) or 1e-300)
                for c in range(len(ll[ids[0]][d]))
            ]
            right += int(max(range(len(scores)), key=scores.__getitem__) == gold[d])
        if right / len(docs) > best:
            best, best_w = right / len(docs), dict(zip(ids, w))
    return best, best_w


def stage_report(args: argparse.Namespace) -> None:
    """The results JSON in the issue's layout, from the harness samples (nothing is recomputed here)."""
    from salm.evaluation.stats import wilson_interval

    work = Path(args.work)
    models: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}  # model -> task -> doc -> row
    for suite in SUITES:
        first = work / "harness" / suite / "-".join(ENSEMBLES[0])
        for mid in MEMBERS:
            for task, rows in _samples(first / mid).items():
                models.setdefault(mid, {})[task] = rows
        runs = sorted(p for p in (work / "harness" / suite).glob("*-*") if (p / "ensemble").is_dir())
        for run in runs:  # every variant scored (VARIANTS, or --gsm8k_variants)
            label = "ensemble" if run.name == "-".join(ENSEMBLES[0]) else f"ensemble:{run.name}"
            for task, rows in _samples(run / "ensemble").items():
                models.setdefault(label, {})[task] = rows
    tasks_out: dict[str, Any] = {}
    right_of: dict[str, dict[str, int]] = {}  # label -> task -> questions right
    n_of: dict[str, int] = {}  # task -> questions
    oracle_of: dict[str, int] = {}  # task -> questions some member gets right
    for task, name in TASK_NAMES.items():
        if task not in models.get(MEMBERS[0], {}):
            continue
        docs = sorted(models[MEMBERS[0]][task])
        acc, ci = {}, {}
        for label, per_task in models.items():
            rows = per_task.get(task)
            if rows is None:
                continue
            right = sum(_correct(rows[d]) for d in docs)
            acc[label] = right / len(docs)
            ci[label] = wilson_interval(right, len(docs))
            right_of.setdefault(label, {})[task] = right
        oracle = sum(any(_correct(models[m][task][d]) for m in MEMBERS) for d in docs)
        entry: dict[str, Any] = {"n": len(docs), "accuracy": acc, "wilson_95": ci, "oracle": oracle / len(docs)}
        if task != "gsm8k_local":
            value, weights = best_constant_mixture({m: models[m][task] for m in MEMBERS})
            acc["best_constant_mixture"], entry["best_constant_mixture_weights"] = value, weights
        if task == "facts_local":  # per fact set: who knows it
            facts = read_jsonl(work / "data" / "eval_facts.jsonl")
            entry["by_set"] = {
                g: {lab: sum(_correct(models[lab][task][d]) for d in docs if facts[d]["group"] == g)
                    / sum(1 for d in docs if facts[d]["group"] == g) for lab in acc if lab in models}
                for g in ("a", "b")
            }  # fmt: skip
        tasks_out[name] = entry
        n_of[task], oracle_of[task] = len(docs), oracle

    def suite_of(tasks: list[str]) -> dict[str, Any]:
        """Pooled over ``tasks``: every model scored on all of them."""
        n = sum(n_of[t] for t in tasks)
        right = {k: sum(v[t] for t in tasks) for k, v in right_of.items() if all(t in v for t in tasks)}
        return {
            "tasks": [TASK_NAMES[t] for t in tasks],
            "n": n,
            "accuracy": {k: v / n for k, v in right.items()},
            "wilson_95": {k: wilson_interval(v, n) for k, v in right.items()},
            "oracle": sum(oracle_of[t] for t in tasks) / n,
        }

    suite = suite_of(list(n_of))
    suite_mc = suite_of([t for t in n_of if t != "gsm8k_local"])
    members = read_members(work / "members.yaml")
    result = {
        "benchmark": "real_specialists",
        "tasks": tasks_out,
        "suite": suite,
        "suite_multiple_choice": suite_mc,  # every ensemble variant (GSM8K generation ran the default only)
        "not_measured": {
            TASK_NAMES[t]: "no harness samples in --work (suite not run)" for t in TASK_NAMES if t not in n_of
        },  # fmt: skip
        "members": members,
        "settings": {k: v for k, v in vars(args).items() if k != "stage"},
        "environment": common.environment("cpu"),
    }
    out = Path(args.out) if args.out else common.RESULTS / "real_specialists.json"
    common.write_json(out, result)
    common.log(f"wrote {out}")


def read_members(path: Path) -> list[dict[str, Any]]:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))["members"]


STAGES = {
    "data": stage_data,
    "specialists": stage_specialists,
    "heads": stage_heads,
    "harness": stage_harness,
    "report": stage_report,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=[*STAGES, "all"])
    p.add_argument("--work", default=str(Path(common.tempfile_dir()) / "salm_real_specialists"))
    p.add_argument("--real", default="/work/real", help="folder of build_real_members.sh (coder-05b, coder-15b)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads_people", type=int, default=30, help="people per set whose facts train the heads")
    p.add_argument("--val_people", type=int, default=8)
    p.add_argument("--test_people", type=int, default=20, help="people per set asked about in the evaluation")
    p.add_argument("--gsm8k_finetune_rows", type=int, default=120)
    p.add_argument("--heads_rows", type=int, default=30, help="rows of GSM8K, MedQA and BoolQ for the heads")
    p.add_argument("--eval_facts", type=int, default=48, help="fact questions scored (half from each set)")
    p.add_argument("--eval_medqa", type=int, default=30, help="held-out MedQA questions scored")
    p.add_argument("--eval_boolq", type=int, default=40, help="held-out BoolQ questions scored")
    p.add_argument("--eval_gsm8k", type=int, default=16, help="GSM8K test questions scored (5-shot generation)")
    p.add_argument("--dtype", default="bfloat16", help="members' dtype (bfloat16: this CPU multiplies it natively)")
    p.add_argument("--epochs_facts", type=int, default=8, help="salm finetune epochs on a fact set")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/real_specialists.json)")
    p.add_argument("--suites", default="mc,gsm8k", help="harness stage: which suites to score (mc, gsm8k)")
    p.add_argument("--gsm8k_fewshot", type=int, default=None, help="GSM8K shots (default: lm-eval's 5)")
    p.add_argument("--gsm8k_variants", default=None, help="GSM8K's ensembles, e.g. default-argmax,all-mixture")
    p.add_argument("--no_pack", dest="pack", action="store_false", help="harness: adapter bases left unpacked")
    args = p.parse_args(argv)
    for name, stage in STAGES.items():
        if args.stage in (name, "all"):
            stage(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
