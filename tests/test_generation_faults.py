"""Generation: bad arguments are one clear error, checked before members load; no shared mode flag is flipped (#10)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from salm.cli import main as cli_main
from salm.generation import GenerationError, generate
from salm.members import MemberError, resolve_device
from tests.conftest import fresh


def test_generation_never_flips_the_models_mode_and_routes_with_eval_heads(tiny_ensemble):
    """Thread B starts, thread A starts; B ends while A is mid-generation. The old code's B restored train mode
    (dropout on) under A; A must route exactly as in eval mode, and nobody's flags may change."""
    model = fresh(tiny_ensemble, head_hidden_dim=16, head_dropout=0.5)
    kw = dict(max_new_tokens=6, temperature=0, return_decisions=True)
    prompt = "Question: what is two plus three?\nAnswer:\n"
    ref = generate(model.eval(), prompt, **kw)
    model.train()
    b_started, a_paused, b_done = threading.Event(), threading.Event(), threading.Event()
    results, modes = {}, []

    def b_streamer(row, d):
        modes.append(model.training)
        if not b_started.is_set():
            b_started.set()
            a_paused.wait(30)

    def a_streamer(row, d):
        modes.append(model.training)
        if not a_paused.is_set():
            a_paused.set()
            b_done.wait(30)

    def run(name, streamer, done=None):
        results[name] = generate(model, prompt, streamer=streamer, **kw)
        if done is not None:
            done.set()

    tb = threading.Thread(target=run, args=("b", b_streamer, b_done))
    tb.start()
    b_started.wait(30)
    ta = threading.Thread(target=run, args=("a", a_streamer))
    ta.start()
    ta.join(60)
    tb.join(60)
    assert model.training and all(modes) and len(modes) >= 12
    assert results["a"] == ref and results["b"] == ref


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": math.nan}, "temperature must be finite"),
        ({"temperature": "0.5"}, "temperature must be a number, got str '0.5'"),
        ({"prompt": 123}, "prompt must be a string or a list of strings, got int"),
        ({"prompt": b"hello"}, "prompt must be a string or a list of strings, got bytes"),
        ({"prompt": None}, "prompt must be a string or a list of strings, got NoneType"),
        ({"prompt": ["ok", "bad \ud800"]}, r"prompt 1 holds an unpaired surrogate '\\ud800' at position 4"),
        ({"prompt": "Zoe has \udcff\udcfe 12"}, r"prompt 0 holds an unpaired surrogate '\\udcff' at position 8"),
        ({"stop": 5}, "stop must be a string or a list of strings, got 5"),
        ({"stop": [1]}, r"stop must be a string or a list of strings, got \[1\]"),
        ({"routing": None}, "routing must be a string .*got NoneType"),
        ({"batch_size": -1}, "batch_size must be an integer >= 1 or None, got -1"),
        ({"top_p": math.nan}, r"top_p must be in \(0, 1\], got nan"),
        ({"top_k": 2.5}, "top_k must be an integer >= 0"),
        ({"seed": "1"}, "seed must be an integer or None, got '1'"),
        ({"seed": 2**63}, r"seed must be >= 0 and < 2\*\*63, got 9223372036854775808"),
        ({"seed": -1}, r"seed must be >= 0 and < 2\*\*63, got -1"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got True"),
    ],
)
def test_bad_generate_arguments(tiny_ensemble, kwargs, message):
    kwargs = {"prompt": "hello", "max_new_tokens": 3, **kwargs}
    with pytest.raises(GenerationError, match=message):
        tiny_ensemble.generate(**kwargs)


def test_cli_decoding_flags_are_checked_before_the_members_load(tmp_path, capsys):
    missing = str(tmp_path / "no_members.yaml")  # loading these would fail: the flag error must come first
    assert cli_main(["generate", "--models", missing, "--temperature", "nan", "hi"]) == 2
    assert capsys.readouterr().err == "salm generate: error: temperature must be finite (0 = greedy), got nan\n"
    assert cli_main(["generate", "--models", missing, "--routing", "vote", "hi"]) == 2
    assert "unknown routing 'vote'" in capsys.readouterr().err
    assert cli_main(["evaluate", "--models", missing, "--temperature", "nan", "--data", f"x={missing}"]) == 2
    assert capsys.readouterr().err == "salm evaluate: error: temperature must be finite (0 = greedy), got nan\n"


def test_unknown_or_absent_devices_name_what_exists(tmp_path, capsys):
    with pytest.raises(MemberError, match="--device 'gpu' is not a device; devices on this machine: cpu"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(MemberError, match="--device 'cuda' is not available on this machine; devices here: cpu"):
            resolve_device("cuda")
        rc = cli_main(["generate", "--device", "cuda:0", "--models", str(tmp_path / "m.yaml"), "hi"])
        assert rc == 2 and capsys.readouterr().err.startswith("salm generate: error: --device 'cuda:0' is not")
    assert resolve_device("cpu") == torch.device("cpu")
