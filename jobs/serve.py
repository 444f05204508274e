"""RayJob entry point of the serve stage: `python jobs/serve.py --config /etc/cmevlm/run.yaml`."""

import sys

from cmevlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
