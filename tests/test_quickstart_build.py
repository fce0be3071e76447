"""The embedded quickstart ensemble: a real (tiny) build, its cache, its data and its report."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import yaml

from salm.quickstart import build as qb
from salm.quickstart import lm as qlm
from salm.quickstart.corpora import (
    DOMAINS,
    MEMBERS_SPLIT,
    SPLITS,
    CorpusConfig,
    documents,
    make_examples,
    make_math_problem,
    parse_final_answer,
    render_example,
    split_domain,
    training_texts,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A private cache root for the whole module (the tiny build is shared by the tests)."""
    root = tmp_path_factory.mktemp("salm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SALM_CACHE", str(root))
        yield root


@pytest.fixture(autouse=True)
def _module_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here sees the module's cache (conftest gives each test a fresh one otherwise)."""
    monkeypatch.setenv("SALM_CACHE", str(cache))


@pytest.fixture(scope="module")
def built(cache: Path) -> qb.QuickstartArtifacts:
    return qb.build_quickstart_members(size="tiny", progress=False)


def test_built_into_cache_folder(built: qb.QuickstartArtifacts, cache: Path) -> None:
    assert not built.reused
    assert built.root == cache / "quickstart" / f"tiny-{built.recipe_hash}"
    assert built.root == qb.quickstart_dir(qb.recipe_for("tiny"))
    assert not [p for p in built.root.parent.iterdir() if ".tmp-" in p.name]


def test_members_load_and_share_one_tokenizer(built: qb.QuickstartArtifacts) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocabs = []
    for member, folder in built.member_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type == "qwen2", member
        assert model.config.vocab_size == len(tok)
        assert tok.eos_token == qlm.EOS_TOKEN and tok.pad_token == qlm.PAD_TOKEN
        assert model.generation_config.eos_token_id == tok.eos_token_id
        digits = tok.convert_ids_to_tokens(tok("x = 1234", add_special_tokens=False)["input_ids"])
        assert [t for t in digits if t.isdigit()] == ["1", "2", "3", "4"]  # one token per digit
        vocabs.append(tok.get_vocab())
    assert vocabs[0] == vocabs[1] == vocabs[2]


def test_members_yaml(built: qb.QuickstartArtifacts) -> None:
    doc = yaml.safe_load(built.members_file.read_text())
    members = doc["members"]
    assert [m["id"] for m in members] == ["general", "code", "math"]
    for m in members:
        assert not Path(m["path"]).is_absolute()
        folder = built.members_file.parent / m["path"]
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        assert re.fullmatch(r"\d+(\.\d)?[KM]", str(m["parameters"]))
        assert m["name"] and m["task"]


def test_data_files_schema_and_disjoint_splits(built: qb.QuickstartArtifacts) -> None:
    for domain in (*DOMAINS, "mixed"):
        questions = {}
        for split in SPLITS:
            rows = [json.loads(line) for line in built.data_files[domain][split].read_text().splitlines()]
            assert rows, (domain, split)
            assert all(set(r) == {"question", "answer", "domain"} and r["question"] and r["answer"] for r in rows)
            if domain != "mixed":
                assert {r["domain"] for r in rows} == {domain}
            questions[split] = {r["question"] for r in rows}
        assert not questions["train"] & questions["validation"], domain
        assert not questions["train"] & questions["test"], domain
        assert not questions["validation"] & questions["test"], domain


def test_document_splits_are_disjoint_and_deterministic() -> None:
    config = qb.recipe_for("tiny").corpus
    names = (MEMBERS_SPLIT, *SPLITS)
    for domain in DOMAINS:
        parts = split_domain(domain, config)
        assert set(parts) == set(names), domain
        ids = {s: {d.doc_id for d in parts[s]} for s in names}
        assert all(ids[s] for s in names), domain
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                assert not ids[a] & ids[b], (domain, a, b)
        assert set().union(*ids.values()) == {d.doc_id for d in documents(domain, config)}
        again = split_domain(domain, dataclasses.replace(config))
        assert {s: [d.doc_id for d in again[s]] for s in names} == {s: [d.doc_id for d in parts[s]] for s in names}


def test_members_train_only_on_their_own_split() -> None:
    """The heads' train split, validation and test are text no member trained on (a router must learn
    from the members' predictions on unseen text)."""
    config = qb.recipe_for("tiny").corpus
    for domain in DOMAINS:
        parts = split_domain(domain, config)
        texts = set(training_texts(domain, config))
        assert {d.text for d in parts[MEMBERS_SPLIT]} <= texts, domain
        for split in SPLITS:
            assert not {d.text for d in parts[split]} & texts, (domain, split)
            pairs = make_examples(domain, 1000, split=split, config=config)
            assert pairs, (domain, split)
            assert not {"".join(render_example(q, a, domain)) for q, a in pairs} & texts, (domain, split)


def test_second_call_reuses_without_retraining(built: qb.QuickstartArtifacts) -> None:
    weights = {m: (d / "model.safetensors").stat().st_mtime_ns for m, d in built.member_dirs.items()}
    again = qb.build_quickstart_members(size="tiny", progress=False)
    assert again.reused and again.root == built.root and again.recipe_hash == built.recipe_hash
    assert {m: (d / "model.safetensors").stat().st_mtime_ns for m, d in again.member_dirs.items()} == weights


def test_recipe_change_gives_another_cache_dir(cache: Path) -> None:
    base = qb.recipe_for("tiny")
    longer = dataclasses.replace(base, math=dataclasses.replace(base.math, steps=base.math.steps + 1))
    other_corpus = dataclasses.replace(base, corpus=CorpusConfig(code_chars=100_000, math_problems=500))
    dirs = {qb.quickstart_dir(r) for r in (base, longer, other_corpus, qb.recipe_for("tiny", seed=1))}
    assert len(dirs) == 4
    assert qb.quickstart_dir(base) == qb.quickstart_dir(qb.recipe_for("tiny"))  # stable
    assert qb.recipe_hash(base) != qb.recipe_hash(dataclasses.replace(base, version=base.version + 1))


def test_crashed_build_leaves_nothing_trusted(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = qb.recipe_for("tiny", seed=7)

    def crash(tmp: Path, *args: object) -> None:
        (tmp / "general").mkdir()
        (tmp / "members.yaml").write_text("members: []\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(qb, "_build_into", crash)
    with pytest.raises(KeyboardInterrupt):
        qb.build_quickstart_members(recipe=recipe, progress=False)
    target = qb.quickstart_dir(recipe)
    assert not target.exists()
    assert not list(target.parent.glob(f".{target.name}.tmp-*"))


def test_refuses_to_overwrite_a_foreign_out_dir(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        qb.build_quickstart_members(out_dir=tmp_path, size="tiny", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_math_solutions_are_arithmetically_correct() -> None:
    rng = random.Random(123)
    step = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)\.$")
    for _ in range(2000):
        p = make_math_problem(rng)
        work, final = p.solution.split("\n")
        parts = re.findall(r"\d+ [+-] \d+ = \d+\.", work)
        assert " ".join(parts) == work and len(parts) == 2
        previous = None
        for part in parts:
            a, op, b, c = step.match(part).groups()
            assert eval(f"{a} {op} {b}") == int(c)  # noqa: S307 -- digits and one operator only
            assert previous is None or int(a) == previous
            assert int(b) < 10 and int(c) >= 0
            assert b in p.question
            previous = int(c)
        assert final == f"#### {previous}" and parse_final_answer(p.solution) == previous == p.result
        assert p.question.endswith("?") and str(p.result) not in p.question.split("?")[-1]


def test_specialists_beat_general_on_their_domain(built: qb.QuickstartArtifacts) -> None:
    report = json.loads(built.report_file.read_text())
    nll = {m: r["nll"] for m, r in report["members"].items()}
    assert nll["code"]["code"] < nll["general"]["code"]
    assert nll["math"]["math"] < nll["general"]["math"]
    assert report["recipe_hash"] == built.recipe_hash
    assert all(report["eval"]["nll_examples"][d] > 0 for d in DOMAINS)
    assert report["checks"] and all(report["checks"].values())  # tiny: no accuracy check (every member ~0%)


def test_reported_numbers_are_those_of_the_saved_members(built: qb.QuickstartArtifacts) -> None:
    """The build report's NLL and accuracy, recomputed from the saved folders (a round trip through disk)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from salm.quickstart.corpora import make_examples

    report = json.loads(built.report_file.read_text())
    recipe = qb.recipe_for("tiny")
    tok = AutoTokenizer.from_pretrained(built.member_dirs["math"])
    model = AutoModelForCausalLM.from_pretrained(built.member_dirs["math"]).eval()
    test = make_examples("math", recipe.eval_nll_examples, seed=recipe.seed + 1, split="test", config=recipe.corpus)
    nll = qlm.answer_nll(model, tok, test, "math")
    accuracy = qlm.math_accuracy(model, tok, test[: recipe.eval_math_problems])
    assert report["members"]["math"]["nll"]["math"] == pytest.approx(nll, abs=1e-4)
    assert report["members"]["math"]["math_accuracy"] == pytest.approx(accuracy)


def test_build_is_the_same_in_another_process_with_other_threads(built: qb.QuickstartArtifacts, tmp_path) -> None:
    """Bit-identical members from a second process with another hash seed and thread count: the build fixes
    its threads and uses deterministic algorithms, so a recorded recipe reproduces on any machine's core count."""
    import os
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(2); from salm.quickstart.build import build_quickstart_members; "
        f"build_quickstart_members(out_dir={str(tmp_path / 'again')!r}, size='tiny', progress=False)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for member, folder in built.member_dirs.items():
        again = tmp_path / "again" / member / "model.safetensors"
        assert again.read_bytes() == (folder / "model.safetensors").read_bytes(), member


def test_kernel_pins_are_recorded_and_name_another_build(built: qb.QuickstartArtifacts, monkeypatch) -> None:
    import torch

    recipe = qb.recipe_for("tiny")
    assert built.report["kernels"]["pins"] == {}
    assert built.report["kernels"]["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert qb.kernel_pins() == {"mkl_cbwr": "COMPATIBLE"}
    assert qb.recipe_hash(recipe) != built.recipe_hash  # a pinned build never reuses an unpinned one


@pytest.mark.slow
def test_pinned_build_does_not_depend_on_mkls_kernels(built: qb.QuickstartArtifacts, tmp_path) -> None:
    """With ATen's capability and MKL's CNR branch pinned, MKL's AVX2 kernels (what AMD CPUs get) and its
    AVX-512 ones give the same bytes; unpinned they do not (checked where the CPU has AVX-512)."""
    import os
    import subprocess
    import sys

    from salm.cpu import cpu_info

    def build(name: str, **env: str) -> dict[str, bytes]:
        out = str(tmp_path / name)
        code = (
            f"from salm.quickstart import build; build.build_quickstart_members({out!r}, size='tiny', progress=False)"
        )
        run = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        return {m: (tmp_path / name / m / "model.safetensors").read_bytes() for m in built.member_dirs}

    pins = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
    assert build("pinned", **pins) == build("pinned-avx2", **pins, MKL_ENABLE_INSTRUCTIONS="AVX2")
    if "avx512_f" in cpu_info().flags:
        native = {m: (d / "model.safetensors").read_bytes() for m, d in built.member_dirs.items()}
        assert build("avx2", MKL_ENABLE_INSTRUCTIONS="AVX2") != native


def test_tokenize_example_matches_pipeline_rendering(built: qb.QuickstartArtifacts) -> None:
    from transformers import AutoTokenizer

    from salm.data.examples import build_prompt

    tok = AutoTokenizer.from_pretrained(built.member_dirs["general"])
    q, a = "Tom has 3 apples and buys 4 more. How many apples does he have now?", "3 + 4 = 7.\n#### 7"
    ids, n_prompt = qlm.tokenize_example(tok, q, a, "math")
    assert tok.decode(ids[:n_prompt]) == build_prompt(q)
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == "Reasoning: 3 + 4 = 7.\nTherefore, the answer is: 7"
