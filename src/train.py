"""The seed's training entry point: ``python src/train.py --datasets ... --output_dir ./model_outputs``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `salm` imports uninstalled too

from salm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
