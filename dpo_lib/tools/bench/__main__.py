"""The bench worker: ``python -m dpo_lib.tools.bench SPEC OUT`` runs one trainer from a spec (JSON)
in this fresh process and writes its timings to OUT (see :mod:`dpo_lib.tools.bench.worker`)."""

import json
import sys
from pathlib import Path

from dpo_lib.tools.bench.worker import child

__all__ = []

if len(sys.argv) != 3:
    print("usage: python -m dpo_lib.tools.bench SPEC OUT (started by `python -m dpo_lib bench --vs trl`)",
          file=sys.stderr)
    sys.exit(2)
Path(sys.argv[2]).write_text(json.dumps(child(json.loads(Path(sys.argv[1]).read_text()))))
