"""One part of one stage in this process (the runner starts one per part):

    python -m mlalm.bench.gpu.worker STAGE PART SPEC-JSON OUT-JSON

writes the part's figures to OUT-JSON as it measures them (``common.Figures``), the
device facts first; on an exception, its traceback under 'error', and exits 1.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback

from mlalm.bench.gpu import STAGES
from mlalm.bench.gpu.common import Figures, device_facts


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4 or argv[0] not in STAGES:
        print(
            f"usage: python -m mlalm.bench.gpu.worker {{{','.join(STAGES)}}} PART SPEC-JSON OUT-JSON",
            file=sys.stderr,
        )
        return 2
    stage, part, spec, path = argv[0], argv[1], json.loads(argv[2]), argv[3]
    out = Figures(path)
    try:
        out["device"] = device_facts()
        out.save()
        if spec.get("fail"):
            raise RuntimeError(f"injected failure (--fail-stage {stage})")
        importlib.import_module(STAGES[stage][0]).run(part, spec, out)
    except Exception as e:  # noqa: BLE001 - recorded for the report, then a non-zero exit
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-4000:]
        out.save()
        print(out["traceback"], file=sys.stderr, flush=True)
        return 1
    out.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
