"""The prepared GPU check (issue 16): every GPU path against its peer, one JSON + one Markdown table.

    python src/gpu_check.py --out logs/gpu_check             # one H100/H200, about 8 minutes
    python src/gpu_check.py --out DIR --tiny                 # CPU, tiny shapes: the code paths only
    python src/gpu_check.py --out DIR --sections flex generate

Sections and what each measures: `cm3leon.bench.gpu_check`. On the offline GPU machine, install the
wheels it lacks first (`../shared/gpu/wheels.sh`, then pip install --no-index .whl/*.whl).
"""

import argparse
import json
from pathlib import Path

from cm3leon.bench.gpu_check import run_check

SECTIONS = ["train_step_350m", "train_stack_350m", "train_7b_proxy", "flex", "generate", "retrieval"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes (what the test suite runs)")
    parser.add_argument("--sections", nargs="*", choices=SECTIONS, help="default: all")
    args = parser.parse_args()
    result = run_check(args.out, tiny=args.tiny, sections=args.sections)
    print(json.dumps(result, default=str))
    print(Path(args.out, "gpu_check.md").read_text())


if __name__ == "__main__":
    main()
