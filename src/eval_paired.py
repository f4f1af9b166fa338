"""Caption-by-caption comparison of two world evaluations (e.g. CFG 3 against no guidance).

    python src/eval_paired.py RUN/eval/topp0.3_cfg1_conditional RUN/eval/topp0.3_cfg3_conditional
    python src/eval_paired.py A_seed0 B_seed0 A_seed1 B_seed1        # pairs of folders, pooled

Each folder is an `src/eval_fid.py eval=embedded` output (prompts.jsonl + images/{index:06d}.png).
Every image is checked against its caption by the world's pixel checker (`cm3leon.data.checker`);
two decodings of the same captions then differ only on the captions one gets right and the other
does not. Those discordant counts and the exact McNemar test (a two-sided binomial test of them,
`scipy.stats.binomtest`) say whether a difference in caption accuracy is more than sampling noise,
far more sharply than the two accuracies' standard errors. One JSON line per pair, then the pool.
"""

from __future__ import annotations

import json
import sys

from cm3leon.cli import UsageError, report_usage_error
from cm3leon.eval.paired import compare_folders


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or len(argv) % 2:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        rows = compare_folders(argv)
    except (FileNotFoundError, ValueError, UsageError) as e:
        report_usage_error(e)
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
