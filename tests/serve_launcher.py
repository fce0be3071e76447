"""Start ``salm serve`` with test-only faults switched on by environment variables (tests/test_serve.py).

- ``SALM_TEST_STEP_DELAY=<s>``: sleep before every decode step (so a request stays in flight long enough
  to disconnect, fill the queue or send SIGTERM while it runs);
- ``SALM_TEST_NO_EOS=1``: no token ends a generation early (random members may emit EOS at any step);
- ``SALM_TEST_FAIL_TEMPERATURE=<t>``: a request with this temperature raises inside the engine;
- ``SALM_TEST_FAIL_LATE_TEMPERATURE=<t>``: the same from its third token on (after streaming began).

Everything else is the real command: ``python tests/serve_launcher.py serve --weights ...``.
"""

from __future__ import annotations

import os
import sys
import time

from salm.cli import main
from salm.serve import engine

delay = float(os.environ.get("SALM_TEST_STEP_DELAY", "0"))
fail_t = os.environ.get("SALM_TEST_FAIL_TEMPERATURE")
fail_late_t = os.environ.get("SALM_TEST_FAIL_LATE_TEMPERATURE")
_step, _choose, _init = engine.Engine._step, engine.Engine._choose, engine.Engine.__init__


def _slow_step(self):
    time.sleep(delay)
    _step(self)


def _faulty_choose(self, req, logits, probs):
    if fail_t is not None and req.params.temperature == float(fail_t):
        raise RuntimeError("injected fault")
    if fail_late_t is not None and req.params.temperature == float(fail_late_t) and req.steps >= 2:
        raise RuntimeError("injected late fault")
    return _choose(self, req, logits, probs)


def _init_no_eos(self, model, *args, **kwargs):
    if os.environ.get("SALM_TEST_NO_EOS"):
        model.eos_token_ids = set()
    _init(self, model, *args, **kwargs)


engine.Engine._step = _slow_step
engine.Engine._choose = _faulty_choose
engine.Engine.__init__ = _init_no_eos

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
