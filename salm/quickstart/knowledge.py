"""The knowledge-split benchmark (``salm knowledge``, flags in :mod:`salm.commands.knowledge`): it isolates
self-aware routing -- does the router send a question to the member that *knows* the answer?

Members are fine-tuned from one small base on *disjoint* sets of synthetic facts (invented people and
their colour / pet / city), asked in one identical template, so nothing in the prompt says which member
knows: alone, each member answers about 1/M of the questions; the oracle (any member) nearly all. A
router that only recognises the domain cannot beat one member here; one that reads the members'
confidence can reach the oracle.

Recipe (built offline on the CPU, cached like the quickstart members, reusing its tokenizer trainer and
training loop from :mod:`salm.quickstart.build`):

1. people are split into ``public`` (known to the base) and M private groups; each group's people are
   split again into heads-train, heads-validation and test people, so the routing heads are scored on
   people they never saw;
2. a BPE tokenizer and a ``base`` member learn the template and every value word on the public facts;
3. member ``k`` is a copy of the base trained further on group ``k``'s facts only.

Metrics per router variant (and for each member alone and the oracle), on the test people's questions:
exact-match accuracy of greedy generated answers; accuracy at the decisive token (the answer's first
token, which fixes the value); captured share of the oracle's NLL gain on the answer tokens; and how often
the decisive token is routed to the member that knows.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from salm.cpu import compute_record
from salm.io import atomic_write_json, cache_root
from salm.members import ModelInfo, write_member_set

logger = logging.getLogger(__name__)

KNOWLEDGE_VERSION = 1
"""Bump whenever code changes what a build produces: new cache key."""

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
    "pet": ("cat", "dog", "horse", "rabbit", "parrot", "turtle", "goat", "mouse"),
    "city": ("Paris", "London", "Rome", "Berlin", "Madrid", "Vienna", "Dublin", "Oslo"),
}
_SYLLABLES = (
    "ka", "lo", "mi", "ra", "ten", "vo", "zu", "bel", "dor", "fin", "gar", "hul", "jas", "kip", "lun", "mar",
    "nor", "pel", "quin", "ros", "sul", "tor", "ul", "vex", "wen", "yar", "zim", "bro", "cal", "dru",
)  # fmt: skip
ROUTER_VARIANTS = {  # name -> salm train settings
    "seed": {"router": "seed"},
    "confidence": {"router": "confidence"},
    "joint": {"router": "joint"},
    "seed+disagreement": {"router": "seed", "disagreement_weight": 4.0},
    "confidence+disagreement": {"router": "confidence", "disagreement_weight": 4.0},
    "joint+disagreement": {"router": "joint", "disagreement_weight": 4.0},
    "aware": {"router": "aware"},
    "aware+disagreement": {"router": "aware", "disagreement_weight": 4.0},
}


@dataclass(frozen=True)
class KnowledgeRecipe:
    """Everything that decides a build; its hash names the cache folder."""

    size: str
    seed: int
    n_members: int
    public_people: int
    people_per_member: tuple[int, int, int]  # heads-train, heads-validation, test people per member
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    base_steps: int
    member_steps: int
    batch_size: int
    lr: float
    seq_len: int = 48
    version: int = KNOWLEDGE_VERSION


def knowledge_recipe(size: str = "default", seed: int = 0) -> KnowledgeRecipe:
    """``default``: three members (~2 minutes on 2 CPU cores); ``tiny``: two members in seconds, for CI."""
    if size == "default":
        return KnowledgeRecipe(size, seed, 3, 40, (30, 6, 12), 512, 128, 2, 4, 200, 300, 16, 3e-3, seq_len=40)
    if size == "tiny":
        return KnowledgeRecipe(size, seed, 2, 8, (6, 2, 4), 320, 32, 1, 2, 30, 40, 16, 3e-3)
    raise ValueError(f"unknown knowledge-split size {size!r}; expected default or tiny")


# ---------------------------------------------------------------------------------------------- facts
@dataclass(frozen=True)
class Fact:
    person: str
    attribute: str
    value: str
    owner: str  # "public" or the member id that knows it
    role: str  # "public", "train", "validation" or "test"

    @property
    def question(self) -> str:
        return f"What is the {self.attribute} of {self.person}?"


def member_ids(recipe: KnowledgeRecipe) -> list[str]:
    return [f"knows-{chr(ord('a') + k)}" for k in range(recipe.n_members)]


def make_facts(recipe: KnowledgeRecipe) -> list[Fact]:
    """Every person's value of every attribute; people are unique two-syllable-pair names."""
    rng = random.Random(f"salm-knowledge-{recipe.seed}")
    per = sum(recipe.people_per_member)
    need = recipe.public_people + recipe.n_members * per
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < need:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        if first + last not in seen:
            seen.add(first + last)
            names.append(f"{first} {last}")
    owners = [("public", "public")] * recipe.public_people
    for mid in member_ids(recipe):
        for role, n in zip(("train", "validation", "test"), recipe.people_per_member):
            owners += [(mid, role)] * n
    return [
        Fact(name, attr, rng.choice(values), owner, role)
        for name, (owner, role) in zip(names, owners)
        for attr, values in ATTRIBUTES.items()
    ]


def fact_example(fact: Fact, index: int):
    """The fact as the pipeline's Example (shared prompt template), dataset = the member that knows it."""
    from salm.data.formats import row_to_example

    return row_to_example({"question": fact.question, "answer": fact.value}, dataset=fact.owner, split=fact.role,
                          index=index)  # fmt: skip


# ---------------------------------------------------------------------------------------------- build
def recipe_hash(recipe: KnowledgeRecipe) -> str:
    from salm.quickstart.corpora import rendering_probe

    payload = json.dumps({"recipe": dataclasses.asdict(recipe), "rendering": rendering_probe()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def say(message: str, progress: bool) -> None:
    """A progress line of ``salm knowledge``: logged, and shown on stderr unless ``progress`` is off."""
    logger.info(message)
    if progress:
        print(f"[salm knowledge] {message}", file=sys.stderr, flush=True)


def _complete(root: Path, digest: str) -> bool:
    try:
        return json.loads((root / "build_report.json").read_text()).get("recipe_hash") == digest
    except (OSError, ValueError):
        return False


def build_knowledge_members(
    recipe: KnowledgeRecipe, out_dir: Path | None = None, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Build (or reuse) the members; returns the folder (holding ``members.yaml``) and its build report.

    Written into a temporary sibling folder renamed into place at the end, as the quickstart build is.
    """
    digest = recipe_hash(recipe)
    target = Path(out_dir) if out_dir else cache_root() / "knowledge" / f"{recipe.size}-{digest}"
    if _complete(target, digest):
        say(f"reusing knowledge-split members (recipe {digest}) at {target}", progress)
        return target, json.loads((target / "build_report.json").read_text())
    if target.exists() and any(target.iterdir()) and not (target / "build_report.json").exists():
        raise FileExistsError(f"{target} is not empty and holds no knowledge-split build; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    say(f"building {recipe.size} knowledge-split members (recipe {digest}) into {target}", progress)
    threads = torch.get_num_threads()
    try:
        # Ops this small gain nothing from a second thread, and one thread cannot stall at OpenMP barriers
        # on a busy machine (as the tiny quickstart build found).
        torch.set_num_threads(1)
        report = _build_into(tmp, recipe, digest, progress)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return target, report


def _build_into(tmp: Path, recipe: KnowledgeRecipe, digest: str, progress: bool) -> dict[str, Any]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from salm.quickstart.lm import TrainPhase, _token_stream, train_lm, train_tokenizer

    t0 = time.perf_counter()
    facts = make_facts(recipe)
    texts = {}
    for i, f in enumerate(facts):
        ex = fact_example(f, i)
        texts.setdefault(f.owner, []).append(ex.prompt + ex.answer)
    tok_texts = [t for group in texts.values() for t in group] + [" ".join(v) for v in ATTRIBUTES.values()]
    tokenizer = train_tokenizer(tok_texts, recipe.vocab_size, tmp / "tokenizer")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=4 * recipe.hidden_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_heads,
        max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(recipe.seed)
    base = Qwen2ForCausalLM(config)
    warm = max(1, recipe.base_steps // 10)
    phase = TrainPhase(steps=recipe.base_steps, lr=recipe.lr, batch_size=recipe.batch_size, warmup=warm)
    curves = {"base": train_lm(base, [_token_stream(tokenizer, texts["public"])], [1.0], phase, recipe.seq_len,
                               recipe.seed, "base (public facts)", progress)}  # fmt: skip
    members = {}
    for k, mid in enumerate(member_ids(recipe)):
        model = copy.deepcopy(base)
        phase = TrainPhase(steps=recipe.member_steps, lr=recipe.lr, batch_size=recipe.batch_size, warmup=warm)
        curves[mid] = train_lm(model, [_token_stream(tokenizer, texts[mid])], [1.0], phase, recipe.seq_len,
                               recipe.seed + 1 + k, f"{mid} (own facts)", progress)  # fmt: skip
        members[mid] = model
    for mid, model in members.items():
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(tmp / mid)
        tokenizer.save_pretrained(tmp / mid)
    shutil.rmtree(tmp / "tokenizer")
    write_member_set(
        tmp / "members.yaml",
        [ModelInfo(mid, f"Knows group {mid[-1]}", mid, task="knowledge") for mid in members],
        comment="saLM knowledge split: members fine-tuned on disjoint synthetic facts",
    )
    report = {
        "recipe_hash": digest,
        "recipe": dataclasses.asdict(recipe),
        "final_train_loss": {m: round(sum(c[-10:]) / len(c[-10:]), 4) for m, c in curves.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(tmp / "build_report.json", report)  # last: marks the build complete
    say(f"built knowledge-split members in {report['seconds']:.0f}s", progress)
    return report


# ---------------------------------------------------------------------------------------------- evaluation
def token_choices(model: Any, examples: list[Any], batch_size: int = 16) -> tuple[torch.Tensor, ...]:
    """Teacher-forced, at every answer position (EOS included): which members' argmax is the gold token
    ``[P, M]``, which member the argmax router picks ``[P]``, whether it is the answer's first token ``[P]``
    whether the members' argmax tokens differ ``[P]``, each member's top-1 log-prob ``[P, M]`` and its record
    on the text so far (mean log-prob of the tokens before, :class:`salm.confidence.History`) ``[P, M]``.

    A member is right when its log-prob of the gold token equals its top-1 log-prob; the confidence
    statistics hold both, so no extra vocabulary pass is needed.
    """
    from salm.confidence import disagreement, stats_dim
    from salm.features import collate, tokenize_examples

    split = tokenize_examples(examples, model.tokenizer, model.context_length or (1 << 20), "answer", "tokens")
    M = len(model.model_ids)
    right, routed, first, differ, tops, records = [], [], [], [], [], []
    with torch.no_grad():
        for a in range(0, len(split), batch_size):
            idx = list(range(a, min(a + batch_size, len(split))))
            ids, mask, labels = collate(split, idx, model.tokenizer.pad_token_id)
            hidden, gold, stats, m = model.member_features(ids, mask, labels)
            starts = torch.zeros_like(m)
            for r, i in enumerate(idx):
                starts[r, split.labels[i].count(-100) - 1] = True  # predicts the first answer token
            h, g, st = [x[m] for x in hidden], gold[m], stats[m]
            cross = st[:, -stats_dim(M) :][:, : M * M]  # the confidence statistics come after the history
            top1 = cross.view(-1, M, M).diagonal(dim1=-2, dim2=-1)
            right.append(g >= top1 - 1e-5)
            routed.append(model.router_logits(h, st).argmax(-1))
            first.append(starts[m])
            differ.append(disagreement(st))
            tops.append(top1)
            records.append(st[:, :M])
    return tuple(torch.cat(x) for x in (right, routed, first, differ, tops, records))


def evaluate_knowledge(model: Any, facts: list[Fact], max_new_tokens: int = 6) -> dict[str, Any]:
    """Generated-answer accuracy, decisive-token accuracy, captured share and routing to the owner.

    Members alone run through the same routed decoding loop with ``routing="member:<id>"``; the oracle is
    right where any member is. At the decisive token a member is right when its log-prob of the gold token
    equals its top-1 log-prob (the statistics hold both, so no extra vocabulary pass is needed).
    ``rule:max_top1`` routes the decisive token to the member with the highest top-1 probability: a
    training-free reference for what confidence alone gives; ``rule:max_record`` to the member with the best
    record on the question (the highest mean log-prob of the tokens before it), what the ``aware`` router adds.
    """
    from salm.evaluation.analysis import teacher_forced_metrics

    ids = list(model.model_ids)
    examples = [fact_example(f, i) for i, f in enumerate(facts)]
    prompts = [ex.prompt for ex in examples]
    gold = [f.value for f in facts]
    owner = torch.tensor([ids.index(f.owner) for f in facts])

    def correct(routing: str) -> torch.Tensor:
        outs = model.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0, routing=routing, stop=["\n"])
        return torch.tensor([o.strip() == g for o, g in zip(outs, gold)])

    gen = {mid: correct(f"member:{mid}") for mid in ids}
    gen["ensemble"] = correct("argmax")
    gen["oracle"] = torch.stack([gen[m] for m in ids]).any(0)

    right, routed, first, _, top1, record = token_choices(model, examples)
    right, routed, top1, record = right[first], routed[first], top1[first], record[first]
    rows = torch.arange(len(facts))
    dec = {mid: right[:, i] for i, mid in enumerate(ids)}
    dec["ensemble"] = right[rows, routed]
    dec["oracle"] = right.any(-1)
    # A fixed rule for reference: the member most sure of its own argmax (no training at all).
    dec["rule:max_top1"] = right[rows, top1.argmax(-1)]
    # ... and the member with the best record on the question (who read it most fluently: who knows it).
    dec["rule:max_record"] = right[rows, record.argmax(-1)]
    tf = teacher_forced_metrics(model, examples, batch_size=32)
    acc = {k: round(float(v.float().mean()), 4) for k, v in gen.items()}
    return {
        "questions": len(facts),
        "generated_accuracy": acc,
        "ensemble_over_oracle": round(acc["ensemble"] / acc["oracle"], 4) if acc["oracle"] else None,
        "decisive_accuracy": {k: round(float(v.float().mean()), 4) for k, v in dec.items()},
        "decisive_routed_to_owner": round(float((routed == owner).float().mean()), 4),
        "captured_share": None if tf["captured_share"] is None else round(tf["captured_share"], 4),
        "answer_nll": {
            "ensemble": round(tf["ensemble_nll"], 4),
            "oracle": round(tf["oracle_nll"], 4),
            **{m: round(v, 4) for m, v in tf["member_nll"].items()},
        },  # fmt: skip
        "router_share": {m: round(v, 4) for m, v in tf["router_share"].items()},
    }


def run_knowledge(
    size: str = "default",
    seed: int = 0,
    output_dir: str | Path = "salm_knowledge",
    variants: list[str] | None = None,
    members_dir: str | None = None,
    num_epochs: int = 20,
    progress: bool = True,
) -> dict[str, Any]:
    """Build/reuse the members, train heads for each router variant with ``salm train``'s code, evaluate."""
    from salm.data import TrainingData
    from salm.training import TrainConfig, train

    recipe = knowledge_recipe(size, seed)
    root, build = build_knowledge_members(recipe, Path(members_dir) if members_dir else None, progress)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = make_facts(recipe)
    by_role: dict[str, list[Fact]] = {}
    for f in facts:
        by_role.setdefault(f.role, []).append(f)
    data = TrainingData(
        train=[fact_example(f, i) for i, f in enumerate(by_role["train"])],
        val=[fact_example(f, i) for i, f in enumerate(by_role["validation"])],
    )
    results: dict[str, Any] = {}
    model = None
    for name in variants or list(ROUTER_VARIANTS):
        if name not in ROUTER_VARIANTS:
            raise ValueError(f"unknown router variant {name!r}; expected one of {', '.join(ROUTER_VARIANTS)}")
        t = time.perf_counter()
        cfg = TrainConfig.from_flat(
            datasets=member_ids(recipe), output_dir=str(out / name), num_epochs=num_epochs, batch_size=16,
            learning_rate=3e-3, warmup_steps=10, entropy_weight=0.0, seed=seed, models=str(root / "members.yaml"),
            device="cpu", dtype="float32", max_length=64, feature_cache_dir=str(out / "feature_cache"),
            plots=False, progress=progress, **ROUTER_VARIANTS[name],
        )  # fmt: skip
        model = train(cfg, model=model, data=data).best_model()
        results[name] = {"settings": ROUTER_VARIANTS[name], **evaluate_knowledge(model, by_role["test"])}
        results[name]["seconds"] = round(time.perf_counter() - t, 1)
        r = results[name]
        say(f"{name}: generated accuracy {r['generated_accuracy']}, decisive {r['decisive_accuracy']['ensemble']}, "
            f"captured {r['captured_share']}", progress)  # fmt: skip
    summary = {
        "what": "knowledge split: members fine-tuned on disjoint synthetic facts, one template",
        "recipe": dataclasses.asdict(recipe),
        "members_dir": str(root),
        "build": build,
        "test_questions": len(by_role["test"]),
        "variants": results,
        "compute": compute_record(model),
    }
    atomic_write_json(out / "knowledge_summary.json", summary)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    rows = ["| router | generated acc. | / oracle | decisive acc. | to owner | captured |", "|---|---|---|---|---|---|"]
    for name, r in summary["variants"].items():
        a = r["generated_accuracy"]
        rows.append(
            f"| {name} | {a['ensemble']:.3f} (members {', '.join(f'{a[m]:.2f}' for m in a if m.startswith('knows'))};"
            f" oracle {a['oracle']:.2f}) | {r['ensemble_over_oracle']} | {r['decisive_accuracy']['ensemble']:.3f} |"
            f" {r['decisive_routed_to_owner']:.3f} | {r['captured_share']} |"
        )
    return "\n".join(rows)
