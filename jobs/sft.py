"""RayJob entry point of the sft stage: `python jobs/sft.py --config /etc/cmevlm/run.yaml`."""

import sys

from cmevlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
