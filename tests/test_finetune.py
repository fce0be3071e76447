"""``salm finetune``: LoRA specialists of a tiny Qwen2 base, their PEFT folders, exact resume, data and errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from salm.cli import main as cli_main
from tests.conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("peft")

TEXT = "The quick brown fox jumps over the lazy dog. Sphinx of black quartz, judge my vow.\n" * 12
QA = [
    {"question": f"Tom has {i} apples and buys {i + 2} more. How many?", "answer": f"{i}+{i + 2}\n#### {2 * i + 2}"}
    for i in range(8)
]


@pytest.fixture(scope="module")
def base(tiny_infos) -> str:
    """The tiny Qwen2 member (hidden 32) as the base model."""
    return tiny_infos[0].path


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    text = tmp_path / "notes.txt"
    text.write_text(TEXT, encoding="utf-8")
    return {"text": text, "qa": write_jsonl(tmp_path / "qa.jsonl", QA)}


def config(base: str, data: dict[str, Path], out: Path, **kw):
    from salm.finetune import FinetuneConfig

    settings = dict(
        base=base, data=[str(data["text"]), str(data["qa"])], output_dir=str(out), lora_r=4, lora_alpha=8.0,
        max_length=32, batch_size=2, max_steps=6, learning_rate=1e-2, dtype="float32", progress=False,
    )  # fmt: skip
    return FinetuneConfig(**{**settings, **kw})


def sha256(folder: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def logits(model, tokenizer, text: str = "Question: what is two plus three?\nAnswer:\n") -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside peft, not ours
def test_training_lowers_the_loss_and_the_folder_loads_with_peft(base, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from salm.finetune import finetune

    tokenizer = AutoTokenizer.from_pretrained(base)
    before_files = sha256(base)
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base), tokenizer)
    result = finetune(config(base, data, tmp_path / "out", eval_data=[str(data["qa"])], max_steps=8))

    report = json.loads((tmp_path / "out" / "finetune_report.json").read_text())
    assert report["eval_loss"]["after"] < report["eval_loss"]["before"] - 0.5
    curve = [r["loss"] for r in report["loss_curve"]]
    assert len(curve) == 8 and sum(curve[-2:]) < sum(curve[:2]) - 0.5
    assert report["tokens_seen"] == sum(r["tokens"] for r in report["loss_curve"]) > 0
    assert report["data"]["train"][0]["kind"] == "text" and report["data"]["train"][1]["rows"] == len(QA)

    adapter = tmp_path / "out" / "adapter"
    assert result.adapter_dir == adapter
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(sha256(str(adapter)))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    tuned = logits(loaded, tokenizer)
    assert torch.equal(tuned, logits(result.model, tokenizer))  # the folder holds exactly the trained adapter
    assert (tuned - base_logits).abs().max() > 1e-2
    assert sha256(base) == before_files  # the base's files ...
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(base), tokenizer), base_logits)  # ... and weights
    assert result.member == {"id": "out", "path": str(Path(base).resolve()), "adapter": str(adapter.resolve())}


def test_resume_after_a_stop_equals_the_uninterrupted_run(base, data, tmp_path):
    """Stopped after step 3 (the checkpoint is step 2's), resumed: the same adapter, bit for bit. Dropout and
    gradient accumulation are on, so the RNG state and the step's rows must both be restored."""
    from safetensors.torch import load_file

    from salm.finetune import finetune

    kw = dict(max_steps=5, save_every=2, lora_dropout=0.2, grad_accum=2, batch_size=1)
    whole = finetune(config(base, data, tmp_path / "whole", **kw))
    stopped = finetune(config(base, data, tmp_path / "parts", **kw), stop_after_step=3)
    assert stopped.steps == 3 and stopped.adapter_dir is None and not (tmp_path / "parts" / "adapter").exists()
    resumed = finetune(config(base, data, tmp_path / "parts", resume=True, **kw))
    assert resumed.report["steps"]["resumed_from"] == 2

    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # trained: B moved from its zero init
    untimed = [
        [{k: v for k, v in r.items() if "seconds" not in k} for r in x.report["loss_curve"]] for x in (whole, resumed)
    ]
    assert untimed[0] == untimed[1]

    # a different setting is refused, naming it
    from salm.finetune import FinetuneError

    with pytest.raises(FinetuneError, match=r"^--resume: the checkpoint in .* other settings \(lora_r: 4 there, 8 now"):
        finetune(config(base, data, tmp_path / "parts", resume=True, **{**kw, "lora_r": 8}))


def test_gradient_checkpointing_trains_the_same_adapter(base, data, tmp_path):
    """Recomputed activations (dropout replayed from the saved RNG state) give the very same steps, which is why
    a run may resume with it switched on."""
    from safetensors.torch import load_file

    from salm.finetune import finetune

    kw = dict(max_steps=3, lora_dropout=0.2)
    plain = finetune(config(base, data, tmp_path / "plain", **kw))
    saved = finetune(config(base, data, tmp_path / "gc", gradient_checkpointing=True, **kw))
    assert (
        saved.model.get_base_model().is_activation_checkpointing
        and not plain.model.get_base_model().is_activation_checkpointing
    )
    a, b = (load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in (plain, saved))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qa_labels_mask_the_prompt_and_text_trains_on_every_token(base, data, tiny_tokenizer):
    from salm.data import load_examples
    from salm.finetune.config import FinetuneConfig
    from salm.finetune.data import load_split

    tok = tiny_tokenizer
    cfg = FinetuneConfig(base=base, data=[str(data["qa"])], max_length=256)
    qa = load_split([str(data["qa"])], tok, cfg, "train").split
    for ex, ids, labels in zip(load_examples(str(data["qa"])), qa.input_ids, qa.labels):
        n_prompt = len(tok(ex.prompt)["input_ids"])
        assert ids[:n_prompt] == tok(ex.prompt)["input_ids"] and labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
        assert tok.decode(ids[n_prompt:-1]) == ex.answer  # the answer in saLM's format (GSM8K's '####' converted)
    everything = load_split([str(data["qa"])], tok, FinetuneConfig(base=base, max_length=256, loss_on="all"), "t")
    assert everything.split.labels == everything.split.input_ids

    text = load_split([str(data["text"])], tok, FinetuneConfig(base=base, max_length=32), "train").split
    assert text.labels == text.input_ids and {len(w) for w in text.input_ids[:-1]} == {32}
    stream = tok(TEXT, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [t for w in text.input_ids for t in w] == stream[: len(stream) - (len(stream) % 32 == 1)]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli_main(["finetune", *argv])
    return rc, capsys.readouterr().err


def test_bad_inputs_are_one_line_errors_before_loading(base, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    common = ["--base", base, "--output_dir", str(out), "--max_steps", "1", "--no_progress"]
    empty_txt, empty_qa = tmp_path / "empty.txt", tmp_path / "empty.jsonl"
    empty_txt.write_text("  \n", encoding="utf-8")
    empty_qa.write_text("", encoding="utf-8")
    cases = [
        (["--data", str(tmp_path / "missing.txt")], f"--data: text file not found: {tmp_path / 'missing.txt'}"),
        (["--data", str(tmp_path / "missing.jsonl")], f"--data: data file not found: {tmp_path / 'missing.jsonl'}"),
        (["--data", str(data["qa"]), "--eval_data", str(tmp_path)],
         f"--eval_data: {tmp_path} is a folder; pass a data file (.jsonl, .json, .parquet, .csv)"),
        (["--data", str(data["qa"]), "--lora_r", "0"], "--lora_r must be >= 1, got 0"),
        (["--data", str(data["qa"]), "--lora_dropout", "1"], "--lora_dropout must be in [0, 1), got 1.0"),
        (["--data", str(empty_txt)], f"{empty_txt}: no text to train on (the file is empty)"),
        (["--data", str(empty_qa)], f"{empty_qa} contains no rows"),
        (["--data", str(data["qa"]), "--target_modules", "q_proj", "qkv", "fc1"],
         f"--target_modules: qkv, fc1 are not a linear layer of {base} (its linear layers: down_proj, gate_proj, "
         "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)"),
    ]  # fmt: skip
    for argv, message in cases:
        rc, err = run_cli([*argv, *common], capsys)
        assert (rc, err) == (2, f"salm finetune: error: {message}\n"), argv
    assert not (out / "adapter").exists() and not (out / "checkpoint").exists()

    # settings are checked before the base is read: a base that does not exist is not what fails
    rc, err = run_cli(["--data", str(data["qa"]), "--lora_r", "-1", "--base", "nobody/no-such-model"], capsys)
    assert (rc, err) == (2, "salm finetune: error: --lora_r must be >= 1, got -1\n")

    # a hub id that is not cached, offline (the tests run with HF_HUB_OFFLINE=1); a folder that is no model
    rc, err = run_cli(["--data", str(data["qa"]), *common, "--base", "nobody/no-such-model"], capsys)
    assert (rc, err) == (2, "salm finetune: error: --base nobody/no-such-model is not in the local Hugging Face "
                         "cache and the hub is offline or unreachable: pass a local model folder (download it once "
                         "where the hub is reachable: hf download nobody/no-such-model --local-dir DIR)\n")  # fmt: skip
    rc, err = run_cli(["--data", str(data["qa"]), *common, "--base", str(tmp_path)], capsys)
    assert (rc, err) == (2, f"salm finetune: error: --base {tmp_path} is not a model folder (config.json, weights, "
                         "tokenizer)\n")  # fmt: skip
    (tmp_path / "config.json").write_text("{}")  # a folder that looks like a model but is none
    rc, err = run_cli(["--data", str(data["qa"]), *common, "--base", str(tmp_path)], capsys)
    assert rc == 2 and err.startswith(f"salm finetune: error: --base: could not load the tokenizer from {tmp_path}: ")
    assert err.count("\n") == 1

    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # as if peft were not installed
    rc, err = run_cli(["--data", str(data["qa"]), *common], capsys)
    assert (rc, err) == (2, 'salm finetune: error: the peft package is missing: pip install -e ".[finetune]"\n')


def test_the_library_refuses_a_string_where_a_list_belongs(base, data, tmp_path):
    from salm.finetune import FinetuneError, finetune

    with pytest.raises(FinetuneError, match=r"^--target_modules must be a list of names, got 'all-linear'$"):
        finetune(config(base, data, tmp_path / "out", target_modules="all-linear"))


def test_every_config_field_is_a_flag_that_reaches_the_config(tmp_path):
    from dataclasses import fields

    from salm.cli import build_parser
    from salm.commands.finetune import config_from_args
    from salm.finetune import FinetuneConfig

    parser = build_parser(["finetune"])
    sub = next(a for a in parser._actions if a.dest == "command").choices["finetune"]
    flags = {a.dest: a for a in sub._actions if a.option_strings}
    d = FinetuneConfig()
    for f in fields(FinetuneConfig):
        if f.name in ("progress", "base", "data"):
            continue
        assert flags[f.name].default == getattr(d, f.name), f.name
    argv = ["finetune", "--base", "org/model", "--data", "a.txt", "b.jsonl", "--output_dir", "o",
            "--eval_data", "e.jsonl", "--lora_r", "8", "--lora_alpha", "4", "--lora_dropout", "0.1",
            "--target_modules", "q_proj", "v_proj", "--learning_rate", "0.001", "--num_epochs", "3",
            "--max_steps", "7", "--batch_size", "2", "--grad_accum", "3", "--warmup_steps", "1",
            "--max_length", "128", "--max_examples", "50", "--loss_on", "all", "--seed", "5", "--dtype", "float32",
            "--device", "cpu", "--gradient_checkpointing", "--save_every", "4", "--resume", "--trust_remote_code",
            "--revision", "v1", "--member_id", "mine", "--members_out", "m.json", "--no_progress"]  # fmt: skip
    assert config_from_args(parser.parse_args(argv)) == FinetuneConfig(
        base="org/model", data=["a.txt", "b.jsonl"], output_dir="o", eval_data=["e.jsonl"], lora_r=8, lora_alpha=4.0,
        lora_dropout=0.1, target_modules=["q_proj", "v_proj"], learning_rate=0.001, num_epochs=3, max_steps=7,
        batch_size=2, grad_accum=3, warmup_steps=1, max_length=128, max_examples=50, loss_on="all", seed=5,
        dtype="float32", device="cpu", gradient_checkpointing=True, save_every=4, resume=True,
        trust_remote_code=True, revision="v1", member_id="mine", members_out="m.json", progress=False,
    )  # fmt: skip


def test_the_command_prints_and_writes_the_member_entry(base, data, tmp_path, capsys):
    from salm.finetune import DEFAULT_TARGET_MODULES, member_entry, write_member_entry

    members = tmp_path / "members.yaml"
    argv = ["--base", base, "--data", str(data["qa"]), "--output_dir", str(tmp_path / "math"), "--max_steps", "1",
            "--lora_r", "2", "--dtype", "float32", "--members_out", str(members), "--no_progress",
            "--target_modules", "all-linear"]  # fmt: skip
    assert cli_main(["finetune", *argv]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == member_entry("math", base, tmp_path / "math" / "adapter")
    adapter_config = json.loads((tmp_path / "math" / "adapter" / "adapter_config.json").read_text())
    adapted = {name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]}
    assert adapted == set(DEFAULT_TARGET_MODULES)  # all-linear: every projection, not the LM head
    import yaml

    assert yaml.safe_load(members.read_text()) == {"members": [{"id": "tiny-0", "path": base}, printed]}
    # a second specialist joins the file; the same id again replaces its entry
    other = member_entry("code", base, tmp_path / "code" / "adapter")
    write_member_entry(members, other)
    write_member_entry(members, {**printed, "adapter": "elsewhere"})
    ids = [m["id"] for m in yaml.safe_load(members.read_text())["members"]]
    assert ids == ["tiny-0", "code", "math"]


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(cfg, **kw):
        (cfg.out / "checkpoint").mkdir(parents=True)
        (cfg.out / "checkpoint" / "state.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr("salm.finetune.finetune", interrupted)
    out = tmp_path / "out"
    rc, err = run_cli(["--base", str(tmp_path), "--data", "x.txt", "--output_dir", str(out)], capsys)
    assert rc == 130
    assert err == (
        f"the same command with --resume continues from the checkpoint in {out}\nsalm finetune: interrupted\n"
    )
