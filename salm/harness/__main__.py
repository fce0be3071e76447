"""``python -m salm.harness ...`` is lm-eval's own command line (``lm_eval ...``) with the ``salm`` model registered
and the offline tasks on the include path (lm-eval 0.4 discovers no models from installed packages, so plain
``lm_eval --model salm`` cannot find it)::

    python -m salm.harness run --model salm --model_args models=members.yaml,weights=best_model,routing=argmax \\
        --device cuda --tasks gsm8k_local --num_fewshot 5 --metadata '{"data_dir": "../shared/data"}' --output_path out/
"""

from __future__ import annotations

import sys

from salm.harness import TASKS_DIR


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import salm.harness.adapter  # noqa: F401  (registers the "salm" model)

    argv = sys.argv[1:]
    if argv and argv[0] in ("run", "ls", "validate") and "--include_path" not in argv:
        argv = [argv[0], "--include_path", str(TASKS_DIR), *argv[1:]]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
