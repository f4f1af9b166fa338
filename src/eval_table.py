"""One Markdown table from several `fid.json` files (e.g. a CFG-weight sweep of `src/eval_fid.py`).

    python src/eval_fid.py -m ckpt=RUN/checkpoints/last.ckpt eval=embedded decoding.guidance_scale=1,3
    python src/eval_table.py logs/eval_fid/embedded            # every fid.json below the folder
    python src/eval_table.py A/fid.json B/fid.json

Rows are sorted by decoding strategy (top-p first), top-p (largest first) and CFG weight. Caption
accuracy carries its binomial standard error (sqrt(p (1 - p) / n)). Results whose captions, checkpoint
or samples per caption differ are not comparable: the table says so in a column instead of hiding it.
"""

from __future__ import annotations

import sys

from cm3leon.cli import UsageError, report_usage_error
from cm3leon.eval.table import read_results, table


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        results = read_results(argv)
    except (FileNotFoundError, ValueError, UsageError) as e:
        report_usage_error(e)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
