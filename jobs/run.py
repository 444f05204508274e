"""The RayJob entry point of every stage and of the whole pipeline:

    python jobs/run.py pipeline --config /etc/cmevlm/run.yaml     (the chart's default RayJob)
    python jobs/run.py sft --config /etc/cmevlm/run.yaml          (a stage's RayJob, for reruns)

The first argument is `pipeline` or a stage of the registry (cmevlm.stages); the rest goes to
the `cmevlm` command unchanged.
"""

import sys

from cmevlm.cli import main
from cmevlm.stages import NAMES

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("pipeline", *NAMES):
        sys.exit(f"usage: python jobs/run.py pipeline|{'|'.join(NAMES)} --config FILE")
    sys.exit(main(sys.argv[1:]))
