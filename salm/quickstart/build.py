"""Build (or reuse) the quickstart ensemble: three small Qwen2 members trained from scratch on the CPU.

The recipe mirrors a real trio (a general model plus two finetunes of it): one BPE tokenizer is trained
on all three domains, a ``general`` member is trained on their mix, and copies of it continue training
on a single domain each to become the ``code`` and ``math`` specialists. Everything is ordinary Hugging
Face folders plus a ``members.yaml``, so the rest of saLM treats them exactly like downloaded models.
The tokenizer builder, the training loop and the held-out scores live in :mod:`salm.quickstart.lm`.

Builds are cached under ``<cache>/quickstart/<size>-<recipe hash>`` and written atomically (temporary
sibling folder, then ``os.replace``), so a crashed build is never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from salm.cpu import cpu_info
from salm.io import cache_root
from salm.members import ModelInfo, write_member_set
from salm.quickstart.corpora import (
    DOMAINS,
    SPLITS,
    CorpusConfig,
    corpus_digest,
    make_examples,
    rendering_probe,
    training_texts,
    write_example_files,
)
from salm.quickstart.lm import (
    TokenStream,
    TrainPhase,
    _token_stream,
    answer_nll,
    math_accuracy,
    train_lm,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

MEMBER_INFO: dict[str, dict[str, str]] = {
    "general": {"name": "Quickstart general (mix)", "task": "general"},
    "code": {"name": "Quickstart code (Python stdlib)", "task": "code"},
    "math": {"name": "Quickstart math (arithmetic)", "task": "math"},
}

BUILD_VERSION = 2
"""Bump whenever code changes what a build produces (generator, cleaning, training loop): new cache key."""

SIZES = ("default", "tiny")
COMPLETE_MARKER = "build_report.json"  # written last inside the temporary folder


# ----------------------------------------------------------------------------------------------------------
# Recipe


@dataclass(frozen=True)
class ModelShape:
    """Qwen2 dimensions shared by all members (specialists are copies of the general member)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int = 512


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the build's output; its hash names the cache folder."""

    size: str
    seed: int
    vocab_size: int
    model: ModelShape
    seq_len: int
    general: TrainPhase
    code: TrainPhase
    math: TrainPhase
    general_mix: tuple[float, float, float]  # sampling weights of (code, prose, math) for the general member
    corpus: CorpusConfig
    example_counts: tuple[int, int, int]  # (question, answer) pairs per domain written for train/val/test
    eval_nll_examples: int  # held-out (test split) examples per domain for the NLL table
    eval_math_problems: int  # held-out problems solved greedily for the accuracy table
    tokenizer_chars_per_domain: int
    # Fixed, because a float sum's rounding depends on how a matmul is split across threads: builds with
    # 1 and 2 threads drift apart over hundreds of steps (the forgotten domains most: a specialist's NLL
    # off its domain moved by 0.3 nats). One thread is also what a busy shared machine runs fastest:
    # no stalls at OpenMP barriers (measured: 5x faster than two threads on a loaded 2-core VM).
    torch_threads: int = 1
    version: int = BUILD_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def recipe_for(size: str = "default", seed: int = 0) -> Recipe:
    """The recipe of a named size: ``default`` (minutes on a CPU) or ``tiny`` (seconds, for CI)."""
    if size == "default":
        return Recipe(
            size=size,
            seed=seed,
            vocab_size=1536,
            model=ModelShape(hidden_size=192, num_layers=3, num_heads=6, num_kv_heads=2, intermediate_size=512),
            seq_len=128,
            # Small batches, many steps: on math, 260 steps of 16 windows reach ~0.8 greedy accuracy where
            # 130 steps of 32 (the same tokens and time) reach ~0.5.
            general=TrainPhase(steps=480, lr=2e-3, batch_size=16, warmup=30),
            code=TrainPhase(steps=180, lr=1e-3, batch_size=16, warmup=10),
            # Replay only for math: its templated text has no English, so without it the specialist
            # forgets everything else (14 nats/token on prose); stdlib code keeps English in docstrings.
            # 400 steps since the members got half of the documents (build 2): with 260 the specialist fell
            # from 0.017 to 0.043 nats per token on held-out problems.
            math=TrainPhase(steps=400, lr=2e-3, batch_size=16, warmup=10, replay=0.1),
            general_mix=(1.0, 1.0, 1.0),
            corpus=CorpusConfig(code_chars=1_500_000, math_problems=20_000, split_seed=seed),
            example_counts=(400, 100, 100),
            eval_nll_examples=100,
            eval_math_problems=50,
            tokenizer_chars_per_domain=400_000,
        )
    if size == "tiny":
        return Recipe(
            size=size,
            seed=seed,
            vocab_size=384,
            model=ModelShape(
                hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_positions=256
            ),
            seq_len=64,
            general=TrainPhase(steps=120, lr=3e-3, batch_size=16, warmup=10),
            code=TrainPhase(steps=60, lr=2e-3, batch_size=16, warmup=5),
            math=TrainPhase(steps=60, lr=2e-3, batch_size=16, warmup=5, replay=0.1),
            general_mix=(1.0, 1.0, 1.0),
            corpus=CorpusConfig(code_chars=400_000, math_problems=2_000, split_seed=seed),
            example_counts=(40, 20, 20),
            eval_nll_examples=20,
            eval_math_problems=10,
            tokenizer_chars_per_domain=60_000,
        )
    raise ValueError(f"unknown quickstart size {size!r}; expected one of {SIZES}")


def kernel_pins() -> dict[str, str]:
    """The CPU-kernel pins the environment sets: ATen's capability (``ATEN_CPU_CAPABILITY``, read when torch is
    imported) and MKL's reproducibility branch (``MKL_CBWR``). Unpinned, the members a recipe gives depend on
    the CPU's kernels (AVX-512 or AVX2, Intel or AMD); pinned (``ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE``)
    they do not, at 2.8x the training time (see the README's quickstart section)."""
    pins = {}
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        pins["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("MKL_CBWR"):
        pins["mkl_cbwr"] = os.environ["MKL_CBWR"]
    return pins


def recipe_hash(recipe: Recipe) -> str:
    """Short hash of the recipe, the corpus text (another Python install means other stdlib text), the
    prompt rendering (a changed template in :mod:`salm.data` means other training text) and any kernel pins
    (:func:`kernel_pins`: a pinned build is another build; unpinned hashes are unchanged by them)."""
    payload: dict[str, Any] = {
        "recipe": recipe.to_json(), "corpus": corpus_digest(recipe.corpus), "rendering": rendering_probe()
    }  # fmt: skip
    if kernel_pins():
        payload["kernels"] = kernel_pins()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def quickstart_dir(recipe: Recipe) -> Path:
    """Cache folder of a recipe's build."""
    return cache_root() / "quickstart" / f"{recipe.size}-{recipe_hash(recipe)}"


# ----------------------------------------------------------------------------------------------------------
# Result


@dataclass
class QuickstartArtifacts:
    """Paths of a finished build. ``data_files[domain][split]``; domain ``mixed`` interleaves all three."""

    root: Path
    members_file: Path
    member_dirs: dict[str, Path]
    data_files: dict[str, dict[str, Path]]
    report_file: Path
    recipe_hash: str
    reused: bool
    report: dict[str, Any] = field(default_factory=dict)

    def examples(self, split: str) -> dict[str, list]:
        """The build's ``split`` (train/validation/test) examples of each domain, as :mod:`salm.data` loads them."""
        from salm.data import load_examples

        return {d: load_examples(str(self.data_files[d][split]), name=d) for d in DOMAINS}


def _artifacts(root: Path, digest: str, reused: bool) -> QuickstartArtifacts:
    data = root / "data"
    return QuickstartArtifacts(
        root=root,
        members_file=root / "members.yaml",
        member_dirs={m: root / m for m in MEMBER_INFO},
        data_files={d: {s: data / f"{d}_{s}.jsonl" for s in SPLITS} for d in (*DOMAINS, "mixed")},
        report_file=root / COMPLETE_MARKER,
        recipe_hash=digest,
        reused=reused,
        report=json.loads((root / COMPLETE_MARKER).read_text()),
    )


def _is_complete(root: Path, digest: str) -> bool:
    try:
        report = json.loads((root / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if report.get("recipe_hash") != digest or not (root / "members.yaml").is_file():
        return False
    return all((root / m / "config.json").is_file() for m in MEMBER_INFO)


def _format_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _write_members_yaml(path: Path, params: dict[str, int]) -> None:
    """``members.yaml`` naming each member folder relative to the file, so the built folder can move."""
    members = [
        ModelInfo(member, info["name"], member, _format_params(params[member]), info["task"])
        for member, info in MEMBER_INFO.items()
    ]
    write_member_set(
        path, members, comment="saLM quickstart ensemble: members built from scratch by salm.quickstart.build"
    )


# ----------------------------------------------------------------------------------------------------------
# Build


def say(message: str, progress: bool) -> None:
    """A quickstart progress line: logged, and shown on stderr unless ``progress`` is off."""
    logger.info(message)
    if progress:
        print(f"[salm quickstart] {message}", file=sys.stderr, flush=True)


def _build_into(tmp: Path, recipe: Recipe, digest: str, progress: bool) -> None:
    """Train everything into ``tmp``; the report (completion marker) is written last.

    Stages: corpora and tokenizer -> the general member, then the specialists from copies of it -> save
    the member folders, ``members.yaml`` and the example files -> held-out evaluation -> the report.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    train_texts = {d: training_texts(d, recipe.corpus) for d in DOMAINS}
    tokenizer = train_tokenizer(_tokenizer_texts(recipe, train_texts), recipe.vocab_size, tmp / "tokenizer")
    streams = [_token_stream(tokenizer, train_texts[d]) for d in DOMAINS]
    timings["tokenizer_and_data"] = time.perf_counter() - t0
    sizes = {d: len(s) for d, s in zip(DOMAINS, streams)}
    say(f"tokenizer: {len(tokenizer)} tokens; training tokens {sizes}", progress)

    models, curves = _train_members(recipe, tokenizer, streams, timings, progress)

    t = time.perf_counter()
    params = _save_members(tmp, models, tokenizer)
    write_example_files(tmp / "data", dict(zip(SPLITS, recipe.example_counts)), seed=recipe.seed, config=recipe.corpus)
    timings["save"] = time.perf_counter() - t

    t = time.perf_counter()
    held_out, problems = _held_out(recipe)
    results = {
        member: {
            "parameters": params[member],
            "nll": {d: round(answer_nll(model, tokenizer, held_out[d], d), 4) for d in DOMAINS},
            "math_accuracy": round(math_accuracy(model, tokenizer, problems), 4),
            "final_train_loss": round(sum(curves[member][-20:]) / len(curves[member][-20:]), 4),
        }
        for member, model in models.items()
    }
    timings["evaluate"] = time.perf_counter() - t
    checks = _checks(recipe, results)
    timings["total"] = time.perf_counter() - t0

    report = {
        "recipe_hash": digest,
        "size": recipe.size,
        "recipe": recipe.to_json(),
        "build_version": BUILD_VERSION,
        "torch_threads": torch.get_num_threads(),
        "kernels": {"pins": kernel_pins(), "cpu": cpu_info().to_dict()},  # what decided the rounding
        "tokenizer_vocab": len(tokenizer),
        "train_tokens": sizes,
        "eval": {
            "split": "test",
            "nll_examples": {d: len(v) for d, v in held_out.items()},
            "math_problems": len(problems),
            "nll_unit": "nats per answer token (EOS included), prompt rendered as by salm.data",
        },
        "members": results,
        "checks": checks,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    (tmp / "recipe.json").write_text(json.dumps(recipe.to_json(), indent=2) + "\n")
    (tmp / COMPLETE_MARKER).write_text(json.dumps(report, indent=2) + "\n")
    for name, ok in checks.items():
        if not ok:
            logger.warning("quickstart build check failed: %s", name)


def _tokenizer_texts(recipe: Recipe, train_texts: dict[str, list[str]]) -> list[str]:
    """An equal share (``tokenizer_chars_per_domain``) of each domain's training text, so no domain starves
    of merges."""
    tok_texts: list[str] = []
    for d in DOMAINS:
        budget = recipe.tokenizer_chars_per_domain
        for text in train_texts[d]:
            if budget <= 0:
                break
            tok_texts.append(text[:budget])
            budget -= len(text)
    return tok_texts


def _train_members(
    recipe: Recipe, tokenizer, streams: list[TokenStream], timings: dict[str, float], progress: bool
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The general member from scratch on the domain mix, then each specialist from a copy of it on its
    domain (plus ``replay`` of the mix); the models and their loss curves."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = recipe.model
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    models: dict[str, Any] = {}
    curves: dict[str, list[float]] = {}
    t = time.perf_counter()
    general = Qwen2ForCausalLM(config)
    curves["general"] = train_lm(
        general, streams, list(recipe.general_mix), recipe.general, recipe.seq_len, recipe.seed,
        "general (mix)", progress,
    )  # fmt: skip
    models["general"] = general
    timings["train_general"] = time.perf_counter() - t
    for offset, member in enumerate(("code", "math"), start=1):
        t = time.perf_counter()
        model = copy.deepcopy(general)
        phase = getattr(recipe, member)
        mix = [w / sum(recipe.general_mix) for w in recipe.general_mix]
        weights = [phase.replay * w + (1 - phase.replay) * (d == member) for d, w in zip(DOMAINS, mix)]
        curves[member] = train_lm(
            model, streams, weights, phase, recipe.seq_len, recipe.seed + offset, f"{member} specialist", progress
        )
        models[member] = model
        timings[f"train_{member}"] = time.perf_counter() - t
    return models, curves


def _save_members(tmp: Path, models: dict[str, Any], tokenizer) -> dict[str, int]:
    """Each member as a Hugging Face folder with its own copy of the tokenizer, and ``members.yaml``;
    returns the parameter counts."""
    from transformers.utils import logging as hf_logging

    params: dict[str, int] = {}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per member is noise here
    try:
        for member, model in models.items():
            folder = tmp / member
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.bos_token_id = tokenizer.eos_token_id
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            params[member] = sum(p.numel() for p in model.parameters())
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    shutil.rmtree(tmp / "tokenizer")  # every member folder has its own identical copy
    _write_members_yaml(tmp / "members.yaml", params)
    return params


def _held_out(recipe: Recipe) -> tuple[dict[str, list[tuple[str, str]]], list[tuple[str, str]]]:
    """Test-split examples per domain (never trained on) for the NLL table, and the math problems solved."""
    cfg, seed = recipe.corpus, recipe.seed + 1
    held_out = {d: make_examples(d, recipe.eval_nll_examples, seed=seed, split="test", config=cfg) for d in DOMAINS}
    problems = held_out["math"][: recipe.eval_math_problems]
    if len(problems) < recipe.eval_math_problems:
        problems = make_examples("math", recipe.eval_math_problems, seed=seed, split="test", config=cfg)
    return held_out, problems


def _checks(recipe: Recipe, results: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """That each specialist really is one: best on its own domain (and, beyond tiny builds, at math)."""
    nll = {m: r["nll"] for m, r in results.items()}
    checks = {
        "code_specialist_best_on_code": nll["code"]["code"] < min(nll["general"]["code"], nll["math"]["code"]),
        "math_specialist_best_on_math": nll["math"]["math"] < min(nll["general"]["math"], nll["code"]["math"]),
        "general_best_on_prose": nll["general"]["prose"] <= min(nll["code"]["prose"], nll["math"]["prose"]),
        "math_specialist_best_accuracy": results["math"]["math_accuracy"]
        > max(results["general"]["math_accuracy"], results["code"]["math_accuracy"]),
    }
    if recipe.size == "tiny":  # seconds of training learn the answer format, not the sums: every member ~0%
        del checks["math_specialist_best_accuracy"]
    return checks


@contextlib.contextmanager
def deterministic_torch(threads: int):
    """A fixed intra-op thread count and torch's deterministic algorithms (an error, not a silent
    difference, if an op has no deterministic CPU kernel); the caller's settings come back afterwards.

    Same recipe, same torch build, same CPU kind: the same bytes, whatever the machine's core count
    and whoever else is using it. Other CPU kinds (AVX-512 vs AVX2 kernels, Intel vs AMD) round differently
    unless the kernels are pinned (:func:`kernel_pins`).
    """
    before = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)


def _clean_stale_temporaries(target: Path, max_age_s: float = 6 * 3600) -> None:
    """Remove temporary build folders of ``target`` left behind by crashed runs."""
    if not target.parent.is_dir():
        return
    now = time.time()
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _publish(tmp: Path, target: Path, digest: str) -> bool:
    """Move the finished ``tmp`` to ``target`` atomically. False when another process published first."""
    if _is_complete(target, digest):
        return False
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return True
    try:
        os.replace(tmp, target)
    except OSError:  # lost a race: a non-empty target appeared meanwhile
        return False
    return True


def build_quickstart_members(
    out_dir: Path | None = None,
    size: str = "default",
    seed: int = 0,
    progress: bool = True,
    recipe: Recipe | None = None,
) -> QuickstartArtifacts:
    """Build the quickstart members, or reuse an identical earlier build.

    ``out_dir`` None: the cache folder of the recipe (see :func:`quickstart_dir`). Given ``out_dir``: that
    exact folder, rebuilt unless it already holds a build of the same recipe; a non-empty folder that is
    not a quickstart build is refused rather than overwritten. ``recipe`` overrides ``size``/``seed``.
    """
    recipe = recipe or recipe_for(size, seed)
    digest = recipe_hash(recipe)
    target = Path(out_dir).expanduser() if out_dir is not None else quickstart_dir(recipe)
    if _is_complete(target, digest):
        say(f"reusing cached {recipe.size} members (recipe {digest}) at {target}", progress)
        return _artifacts(target, digest, reused=True)
    foreign = target.exists() and any(target.iterdir()) and not (target / COMPLETE_MARKER).exists()
    if out_dir is not None and foreign:
        raise FileExistsError(f"{target} is not empty and holds no quickstart build; refusing to overwrite it")

    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temporaries(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    say(f"building {recipe.size} members (recipe {digest}) into {target}", progress)
    try:
        with deterministic_torch(recipe.torch_threads):
            _build_into(tmp, recipe, digest, progress)
        published = _publish(tmp, target, digest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not published:
        if not _is_complete(target, digest):
            raise RuntimeError(f"could not publish the quickstart build to {target}")
        say(f"another process finished the same build first; using {target}", progress)
        return _artifacts(target, digest, reused=True)
    art = _artifacts(target, digest, reused=False)
    secs = art.report["seconds"]["total"]
    say(f"built {recipe.size} members in {secs:.0f}s: {target}", progress)
    return art
