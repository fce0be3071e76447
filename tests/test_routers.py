"""The router interface: a router defined here alone (no change to the package) trains, saves, loads, generates
and serves; runaway head weights are an error naming them, never a silent NaN routing."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from salm.confidence import history_dim
from salm.ensemble import WEIGHTS_NAME, MultiModelWithScalarHeads, RoutingError, WeightsError
from salm.heads import HeadConfig, HeadConfigError
from salm.routers import Router, registry
from salm.training import TrainConfig, train
from tests.conftest import PROMPTS, batch, fresh, write_jsonl

REPO = Path(__file__).resolve().parents[1]


class RecordRouter(Router):
    """Reads the members' record on the text so far and *not* their next-token statistics (no built-in router
    reads that combination): one linear score per member's hidden state plus a linear map of the record."""

    name = "record"
    reads_history = True

    def __init__(self, member_ids, hidden_sizes, config):
        super().__init__(member_ids, hidden_sizes, config)
        self.by_state = nn.ModuleDict({m: nn.Linear(h, 1) for m, h in zip(self.member_ids, self.hidden_sizes)})
        self.by_record = nn.Linear(history_dim(len(self.member_ids)), len(self.member_ids))

    def forward(self, hidden_states, inputs=None):
        record = self.read(inputs)
        scores = torch.cat([self.by_state[m](h) for m, h in zip(self.member_ids, hidden_states)], -1)
        return (scores + self.by_record(record)).float()


@pytest.fixture
def record_router(monkeypatch):
    """``record`` registered for this test only (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_router(RecordRouter)
    return RecordRouter


ROWS = [
    {"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}. The answer is: {a + b}"}
    for a in range(2, 7)
    for b in range(1, 4)
]


def test_a_router_defined_outside_the_package_trains_saves_loads_generates_and_serves(
    record_router, tiny_ensemble, tmp_path
):
    data = write_jsonl(tmp_path / "sums.jsonl", ROWS)
    cfg = TrainConfig.from_flat(
        datasets=[str(data)], output_dir=str(tmp_path / "run"), num_epochs=3, batch_size=4, router="record",
        head_hidden_dim=16, val_fraction=0.25, warmup_steps=0, learning_rate=3e-3, plots=False, progress=False,
    )  # fmt: skip
    res = train(cfg, model=fresh(tiny_ensemble, seed=1, head_hidden_dim=16))
    assert res.model.router == "record" and isinstance(res.model.router_module, RecordRouter)
    assert res.best_val_nll < res.initial_val_nll  # it learned something
    trained = res.best_model()
    assert set(trained.state_dict()) == {
        *(f"by_state.{m}.{p}" for m in trained.model_ids for p in ("weight", "bias")),
        "by_record.weight",
        "by_record.bias",
    }

    # Saved and loaded: the folder names the router; the loaded heads route identically.
    loaded = MultiModelWithScalarHeads.from_pretrained(tmp_path / "run" / "best_model", device="cpu")
    assert loaded.router == "record" and loaded.head_config == trained.head_config
    ids, mask = batch(loaded, PROMPTS)
    torch.testing.assert_close(loaded(ids, mask).router_logits, trained(ids, mask).router_logits)

    # It reads the record: the same hidden states with another record route differently.
    hidden, _, stored, _ = loaded.member_features(ids, mask, ids.masked_fill(mask == 0, -100))
    other = stored.clone()
    other[..., : history_dim(3)] -= 1.0
    assert not torch.equal(loaded.router_logits(hidden, stored), loaded.router_logits(hidden, other))

    # Generation: batched = alone, static caches = dynamic, and the server's engine = generate.
    gen = dict(max_new_tokens=6, temperature=0, return_outputs=True)
    ref = loaded.generate(PROMPTS, **gen)
    assert [o.token_ids for o in loaded.generate(PROMPTS, cache_implementation="static", **gen)] == [
        o.token_ids for o in ref
    ]
    assert [loaded.generate([p], **gen)[0].token_ids for p in PROMPTS] == [o.token_ids for o in ref]
    assert [_served(loaded, p, 6) for p in PROMPTS] == [o.text for o in ref]


def _served(model, prompt: str, n: int) -> str:
    from salm.serve.engine import Engine, FinishEvent, SamplingParams

    done, got = threading.Event(), []

    def sink(event):
        if isinstance(event, FinishEvent):
            got.append(event.text)
            done.set()

    engine = Engine(model, max_batch=2).start()
    try:
        engine.submit(model.tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=n, temperature=0.0), sink)
        assert done.wait(60)
    finally:
        engine.shutdown()
    return got[0]


def test_unknown_routers_and_unreadable_weights_are_named(record_router, tiny_ensemble, tmp_path):
    known = "seed, confidence, joint, aware, evidence, record"
    with pytest.raises(HeadConfigError, match=f"HeadConfig.router must be one of {known}; got 'moe'"):
        HeadConfig(router="moe")
    with pytest.raises(HeadConfigError, match="router name 'seed' is taken by salm.routers.seed.SeedRouter"):
        registry.register_router(type("Other", (RecordRouter,), {"name": "seed"}))
    # Bare weights carry no config: a router that cannot be told from its tensors is refused, naming the way out.
    ens = fresh(tiny_ensemble, router="record")
    save_file({k: v.contiguous() for k, v in ens.state_dict().items()}, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(WeightsError, match="cannot tell the router of these head weights .* save_pretrained wrote"):
        MultiModelWithScalarHeads.from_pretrained(tmp_path / WEIGHTS_NAME, base_models=tiny_ensemble.infos)


def _runaway(tiny_ensemble, tmp_path: Path) -> Path:
    """Heads scaled by 1e30: every tensor finite (they pass the load check), the activations overflow."""
    ens = fresh(tiny_ensemble, seed=5, router="aware")
    with torch.no_grad():
        for p in ens.parameters():
            p.mul_(1e30)
    return ens.save_pretrained(tmp_path / "runaway")


@pytest.mark.parametrize("routing", ["argmax", "mixture"])
def test_runaway_head_weights_are_an_error_naming_them(tiny_ensemble, tmp_path, routing):
    folder = _runaway(tiny_ensemble, tmp_path)
    ens = MultiModelWithScalarHeads.from_pretrained(folder, device="cpu")
    for kw in ({}, {"cache_implementation": "static"}):
        with pytest.raises(RoutingError, match=f"non-finite routing probabilities at generated token 1.*{folder}"):
            ens.generate(PROMPTS, max_new_tokens=4, temperature=0, routing=routing, **kw)
    ids, mask = batch(ens, PROMPTS)
    with pytest.raises(RoutingError, match=r"overflow \(largest \|value\| \S+ in "):
        ens(ids, mask)
    # Forcing one member never consults the heads: it still works.
    assert ens.generate(PROMPTS[0], max_new_tokens=3, temperature=0, routing="member:tiny-1")


def test_runaway_heads_fail_the_command_with_one_line(tiny_ensemble, tmp_path):
    folder = _runaway(tiny_ensemble, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "salm.cli", "generate", "--weights", str(folder), "--device", "cpu",
         "--max_new_tokens", "4", "Question: 2+3?"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "salm generate: error: the routing heads produced non-finite routing probabilities" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_runaway_heads_fail_the_served_request_not_the_server(tiny_ensemble, tmp_path):
    from salm.serve.engine import Engine, ErrorEvent, FinishEvent, SamplingParams

    bad = MultiModelWithScalarHeads.from_pretrained(_runaway(tiny_ensemble, tmp_path), device="cpu")
    events, done = [], threading.Event()

    def sink(event):
        events.append(event)
        if isinstance(event, (ErrorEvent, FinishEvent)):
            done.set()

    engine = Engine(bad, max_batch=2).start()
    try:
        engine.submit(bad.tokenizer(PROMPTS[0])["input_ids"], SamplingParams(max_tokens=4, temperature=0.0), sink)
        assert done.wait(60)
    finally:
        engine.shutdown()
    assert len(events) == 1 and isinstance(events[0], ErrorEvent)
    assert "non-finite routing probabilities" in events[0].message and "runaway" in events[0].message
