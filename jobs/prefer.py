"""RayJob entry point of the prefer stage: `python jobs/prefer.py --config /etc/cmevlm/run.yaml`."""

import sys

from cmevlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["prefer", *sys.argv[1:]]))
