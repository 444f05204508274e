"""RayJob entry point of the ingest stage: `python jobs/ingest.py --config /etc/cmevlm/run.yaml`."""

import sys

from cmevlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
