"""RayJob entry point of the teach stage: `python jobs/teach.py --config /etc/cmevlm/run.yaml`."""

import sys

from cmevlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["teach", *sys.argv[1:]]))
