"""The SFT data mixture: per-source weights with the paper's up/down-sampling caps, resolved into
a deterministic plan of which samples each epoch reads.

Weights (PAPER.md section 7: "datasets balanced with up/down-sampling caps 3 / 0.3"): a source's
weight is its share of an epoch before the caps. With N_s samples per source and weights w_s
(weight 0: the source is off), an epoch keeps the natural total N = sum N_s and asks each source
for N * w_s / sum(w) samples; the factor against its own size is capped,

    factor_s = clip(N * w_s / sum(w) / N_s, min_keep, max_repeat)      (0.3 and 3 in the paper)
    samples_s = round(factor_s * N_s)                                    (samples of s per epoch)

so a small source is repeated at most 3x and a large one is kept at least 0.3x of its size. Equal
weights and equal sizes give factor 1 everywhere (every sample once per epoch).

The plan of an epoch (`epoch_plan`) is a pure function of (seed, epoch): a source with
samples_s = q N_s + r (q whole copies, r < N_s) reads every sample q times and r more samples, drawn
without replacement and spread over its shards in proportion to their sizes (largest remainder),
a different draw each epoch; so a down-sampled source is read 0.3x per epoch but all of it over the
epochs. The plan is a list of entries (shard, copy, sample indices), shuffled; the stream reads its
readers' entries in order (`sft_stream.SftShardStream`), which is what makes resume exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cm3leon.errors import UsageError


@dataclass(frozen=True)
class MixtureShare:
    """What the mixture resolved for one source: size (samples), weight, capped factor, samples per
    epoch, and which cap applied (None, 'max_repeat' or 'min_keep')."""

    size: int
    weight: float
    factor: float
    samples: int
    capped: str | None = None


def resolve_mixture(
    sizes: Mapping[str, int], weights: Mapping[str, float], max_repeat: float, min_keep: float
) -> dict[str, MixtureShare]:
    """Source name -> MixtureShare for the sources with weight > 0 (formula: module docstring; the
    caps are data.mixture's, conf/data/sft/defaults.yaml: the paper's 3 and 0.3)."""
    if not 0 < min_keep <= 1 <= max_repeat:
        raise UsageError(f"data.mixture: need 0 < min_keep={min_keep} <= 1 <= max_repeat={max_repeat}")
    if any(w < 0 for w in weights.values()):
        raise UsageError(f"data.sources weights must be >= 0, got {dict(weights)}")
    on = {name: int(sizes[name]) for name, w in weights.items() if w > 0}
    empty = [name for name, n in on.items() if n <= 0]
    if not on or empty:
        raise UsageError(
            f"the SFT mixture has no samples for {empty or 'any source'}: give every source with weight > 0 "
            "training samples (or weight 0)"
        )
    total, weight_sum = sum(on.values()), sum(weights[name] for name in on)
    out = {}
    for name, size in on.items():
        wanted = total * weights[name] / weight_sum / size
        factor = min(max(wanted, min_keep), max_repeat)
        capped = "max_repeat" if wanted > max_repeat else "min_keep" if wanted < min_keep else None
        out[name] = MixtureShare(size, float(weights[name]), factor, math.floor(factor * size + 0.5), capped)
    return out


def mixture_table(shares: Mapping[str, MixtureShare], tasks: Mapping[str, str]) -> str:
    """The resolved mixture as a few lines (logged once at setup)."""
    total = sum(s.samples for s in shares.values())
    lines = [f"SFT mixture: {total} samples per epoch"]
    for name, s in shares.items():
        cap = f" (capped: {s.capped})" if s.capped else ""
        lines.append(
            f"  {name:<12} {tasks[name]:<9} size {s.size:>8}  weight {s.weight:g}  x{s.factor:.3f}{cap}  "
            f"-> {s.samples} per epoch ({100 * s.samples / total:.1f}%)"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class PlanEntry:
    """Samples `indices` (into the shard's samples, in reading order) of shard `shard` (an index into
    the stream's shard list), read as copy `copy` (copies of one sample differ in CM3 masking)."""

    shard: int
    copy: int
    indices: np.ndarray


def _apportion(total: int, counts: Sequence[int]) -> list[int]:
    """Split `total` over shards in proportion to `counts` (largest remainder; ties: first shard)."""
    n = sum(counts)
    exact = [total * c / n for c in counts]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(counts)), key=lambda j: (-(exact[j] - out[j]), j))
    for j in order[: total - sum(out)]:
        out[j] += 1
    return out


@dataclass(frozen=True)
class MixturePlan:
    """The training plan: `shards[s]` = (first shard index, sample counts of the source's shards) for
    each source, `samples[s]` = its samples per epoch. `plan(epoch)` -> shuffled PlanEntry list."""

    shards: tuple[tuple[int, tuple[int, ...]], ...]
    samples: tuple[int, ...]
    seed: int

    def __call__(self, epoch: int) -> list[PlanEntry]:
        entries = []
        for (first, counts), wanted in zip(self.shards, self.samples):
            whole, rest = divmod(wanted, sum(counts))
            extra = _apportion(rest, counts)
            for j, (count, k) in enumerate(zip(counts, extra)):
                shard = first + j
                for copy in range(whole):
                    entries.append((shard, copy, np.arange(count)))
                if k:
                    pick = np.random.default_rng([self.seed, epoch, shard, 1]).choice(count, k, replace=False)
                    entries.append((shard, whole, np.sort(pick)))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(entries))
        out = []
        for i in order:  # each entry read in its own shuffled order
            shard, copy, idx = entries[i]
            perm = np.random.default_rng([self.seed, epoch, shard, 2, copy]).permutation(idx)
            out.append(PlanEntry(shard, copy, perm))
        return out

    def entries_per_epoch(self) -> int:
        """Entries of every epoch (the same count each epoch: only which samples changes)."""
        n = 0
        for (_, counts), wanted in zip(self.shards, self.samples):
            whole, rest = divmod(wanted, sum(counts))
            n += whole * len(counts) + sum(1 for k in _apportion(rest, counts) if k)
        return n


@dataclass(frozen=True)
class ValidationPlan:
    """The validation plan: the first `per_source` samples of each source (all: None), in order."""

    shards: tuple[tuple[int, tuple[int, ...]], ...]
    per_source: int | None = None

    def __call__(self, epoch: int) -> list[PlanEntry]:
        out = []
        for first, counts in self.shards:
            left = sum(counts) if self.per_source is None else self.per_source
            for j, count in enumerate(counts):
                if left <= 0:
                    break
                out.append(PlanEntry(first + j, 0, np.arange(min(count, left))))
                left -= count
        return out
