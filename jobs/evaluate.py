"""RayJob entry point of the evaluate stage: `python jobs/evaluate.py --config /etc/cmevlm/run.yaml`."""

import sys

from cmevlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
