"""The seed's evaluation entry point: ``python evaluate.py --datasets all --sample_size 50 ...``."""

import sys

from salm.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
