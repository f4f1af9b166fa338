"""Logit processors, the decoding recipe and the picker: every decoding strategy of PAPER.md section 5
as pure functions on logits [B, V] (no model, no cache).

Guidance, as implemented (streams are ordered conditional first, unconditional last):
- CFG:          expert = uncond + g (cond - uncond) on raw logits, g = `guidance_scale`. (Using
                log-probs instead gives the same distribution: each stream's log-softmax shift is a
                per-row constant.) Top-k / top-p then pick the candidates from the guided
                distribution (truncate_on "guided") or from the conditional stream's
                ("conditional"; sampled by guided probability).
- instruct-CFG: expert = uncond + s_img (img_cond - uncond) + s_txt (full - img_cond).
- CD-K:         on the expert's next-token distribution p_e (softmax of the guided logits, so
                guidance_scale 1 makes it the conditional stream, the paper's formula) and the
                amateur p_a = softmax(uncond / amateur_temperature) (the unconditional stream, as in
                Meta's code): score(t) = log p_e(t) - log p_a(t) on
                V = {t : p_e(t) >= alpha * kth_largest(p_e)}, -inf elsewhere; the token is sampled
                from softmax(score / temperature) (0: argmax).
- mixed:        half the samples (odd global sample index) use CD-K, the others top-p.
Restrictions (image ids only, text ids + <eoss>) are applied to the guided logits and to the
amateur before any softmax, so every distribution is over the allowed ids.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

NEG_INF = float("-inf")
STRATEGIES = ("topp", "cdk", "mixed")
TRUNCATE_ON = ("guided", "conditional")


# =============================================================================================
# Logit processors and samplers (pure functions; logits [B, V] unless said otherwise)
# =============================================================================================
def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature: [B, V] -> [B, V] (temperature > 0)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 here (0 means greedy: use argmax)")
    return logits / temperature if temperature != 1.0 else logits


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """-inf outside the k largest logits of each row (ties at the k-th value kept): [B, V] -> [B, V]."""
    k = min(int(k), logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches `top_p`: [B, V] -> [B, V].

    A token is kept when the mass of the strictly more likely tokens is still below top_p, so the
    most likely token is always kept and the kept mass is >= top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def restrict(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """-inf where `allowed` [V] (bool) is False: [B, V] -> [B, V]."""
    return logits if allowed is None else logits.masked_fill(~allowed, NEG_INF)


def restrict_to_range(logits: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """-inf outside ids [lo, hi): [B, V] -> [B, V]."""
    return restrict(logits, id_mask(logits.shape[-1], [(lo, hi)], logits.device))


def id_mask(vocab_size: int, ranges: Sequence[tuple[int, int]], device=None) -> torch.Tensor:
    """bool [V], True on the half-open id ranges given."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    for lo, hi in ranges:
        mask[lo:hi] = True
    return mask


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond). [B, V] x2 -> [B, V]."""
    return uncond + scale * (cond - uncond)


def instruct_cfg_logits(
    full: torch.Tensor, img_cond: torch.Tensor, uncond: torch.Tensor, image_weight: float, text_weight: float
) -> torch.Tensor:
    """Instruct-CFG (InstructPix2Pix): uncond + s_img (img_cond - uncond) + s_txt (full - img_cond).
    [B, V] x3 -> [B, V]."""
    return uncond + image_weight * (img_cond - uncond) + text_weight * (full - img_cond)


def cdk_candidates(expert_logits: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """CD-K's plausible set V = {t : p_e(t) >= alpha * (k-th largest p_e)}: [B, V] logits -> bool [B, V].

    Computed in log space (log p >= log alpha + log p_(k)); tokens with p_e = 0 (masked) never qualify."""
    logp = expert_logits.float().log_softmax(dim=-1)
    k = min(int(k), logp.shape[-1])
    kth = logp.topk(k, dim=-1).values[:, -1:]  # [B, 1]
    threshold = kth + (np.log(alpha) if alpha > 0 else NEG_INF)
    return (logp >= threshold) & torch.isfinite(logp)


def cdk_scores(
    expert_logits: torch.Tensor,
    amateur_logits: torch.Tensor,
    *,
    alpha: float = 0.5,
    k: int = 5,
    amateur_temperature: float = 0.5,
) -> torch.Tensor:
    """CD-K scores: log p_e - log p_a on `cdk_candidates`, -inf elsewhere. [B, V] x2 -> float [B, V].

    p_e = softmax(expert_logits), p_a = softmax(amateur_logits / amateur_temperature)."""
    logp_e = expert_logits.float().log_softmax(dim=-1)
    logp_a = (amateur_logits.float() / amateur_temperature).log_softmax(dim=-1)
    keep = cdk_candidates(expert_logits, alpha, k)
    return (logp_e - logp_a).masked_fill(~keep, NEG_INF)


def truncate(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float | None = None, top_k: int | None = None
) -> torch.Tensor:
    """temperature, then top-k, then top-p (-inf outside the kept set): [B, V] -> float [B, V]."""
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None and top_k > 0:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    return logits


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> sampled ids [B] (temperature, then top-k, then top-p); temperature 0 is greedy."""
    if temperature == 0:
        return logits.float().argmax(dim=-1)
    probs = truncate(logits, temperature, top_p, top_k).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# =============================================================================================
# Decoding configuration and the picker
# =============================================================================================
@dataclass
class DecodingConfig:
    """One decoding recipe (conf/decoding/*.yaml). Defaults: plain sampling, no guidance.

    strategy:     "topp" (temperature / top-k / top-p), "cdk" (contrastive decoding TopK) or
                  "mixed" (half the samples each).
    guidance_scale: classifier-free guidance weight a_c (1.0 = the conditional stream alone). The
                  old name `cfg_weight` is accepted by `from_dict` with a deprecation message.
    cdk_alpha, cdk_k, cdk_amateur_temperature: CD-K (PAPER.md: alpha and k unpublished; Meta's code
                  uses alpha 0.5 and amateur temperature 0.5; k = 5 is this project's choice).
    cdk_temperature: sampling temperature over the CD-K scores (None: `temperature`; 0: argmax).
    image_weight, text_weight: instruct-CFG weights for editing (paper: 1.5 / 7.5).
    truncate_on:  which distribution top-k / top-p choose the candidate tokens from under guidance:
                  "guided" (the CFG logits: truncation after guidance) or "conditional" (the
                  conditional stream's, at the same temperature; the token is then sampled from the
                  guided distribution over those candidates). The paper does not say; "conditional"
                  keeps guidance from promoting tokens the conditional model itself finds implausible
                  (guidance multiplies a token's probability by (p_cond / p_uncond)^(w - 1), which can
                  be huge for a token both streams find unlikely).
    """

    strategy: str = "topp"
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    guidance_scale: float = 1.0
    cdk_alpha: float = 0.5
    cdk_k: int = 5
    cdk_amateur_temperature: float = 0.5
    cdk_temperature: float | None = None
    image_weight: float = 1.5
    text_weight: float = 7.5
    truncate_on: str = "guided"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"decoding.strategy={self.strategy!r} is not one of {STRATEGIES}")
        if self.truncate_on not in TRUNCATE_ON:
            raise ValueError(f"decoding.truncate_on={self.truncate_on!r} is not one of {TRUNCATE_ON}")
        if self.temperature < 0 or (self.top_p is not None and not 0 < self.top_p <= 1):
            raise ValueError(f"need decoding.temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if not 0 <= self.cdk_alpha <= 1 or self.cdk_k < 1 or self.cdk_amateur_temperature <= 0:
            raise ValueError("need 0 <= decoding.cdk_alpha <= 1, cdk_k >= 1, cdk_amateur_temperature > 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "DecodingConfig":
        """From a Hydra `decoding` node; unknown keys name themselves (`name` is ignored)."""
        d = {k: v for k, v in dict(d or {}).items() if k != "name"}
        old = d.pop("cfg_weight", None)
        if old is not None:
            warnings.warn(
                f"decoding.cfg_weight is deprecated: use decoding.guidance_scale (taking guidance_scale={old})",
                FutureWarning,
                stacklevel=2,
            )
            d["guidance_scale"] = old
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"decoding config has unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_uncond(self) -> bool:
        """Whether the unconditional stream is needed (guidance or CD-K's amateur)."""
        return self.strategy != "topp" or self.guidance_scale != 1.0


class Picker:
    """Combines the streams' logits [S, B, V] into one token per sample [B].

    S = 1: the conditional stream alone; S = 2: (cond, uncond) with CFG; S = 3: (full, img_cond,
    uncond) with instruct-CFG. CD-K's amateur is always the last (unconditional) stream.
    `cdk_rows` (bool [B]) chooses CD-K per sample for the mixed strategy.
    """

    def __init__(
        self, cfg: DecodingConfig, generator: torch.Generator | None = None, cdk_rows: torch.Tensor | None = None
    ):
        self.cfg, self.generator, self.cdk_rows = cfg, generator, cdk_rows
        # decided once here: a per-step `.any()` would sync the GPU every token
        self._any_cdk = cfg.strategy == "cdk" or (
            cfg.strategy == "mixed" and cdk_rows is not None and bool(cdk_rows.any())
        )

    def expert(self, logits: torch.Tensor) -> torch.Tensor:
        """Guided logits [B, V] from the streams [S, B, V]."""
        c = self.cfg
        if logits.shape[0] == 1:
            return logits[0]
        if logits.shape[0] == 2:
            return guided_logits(logits[0], logits[1], c.guidance_scale)
        if logits.shape[0] == 3:
            return instruct_cfg_logits(logits[0], logits[1], logits[2], c.image_weight, c.text_weight)
        raise ValueError(f"Picker takes 1, 2 or 3 streams, got {logits.shape[0]}")

    def __call__(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """logits [S, B, V] (float), allowed bool [V] or None -> ids [B]."""
        c = self.cfg
        expert = restrict(self.expert(logits.float()), allowed)
        topp = None
        if c.strategy in ("topp", "mixed"):
            if c.truncate_on == "conditional" and logits.shape[0] > 1 and c.temperature > 0:
                # candidates from the conditional stream, probabilities from the guided logits
                keep = torch.isfinite(truncate(restrict(logits[0].float(), allowed), c.temperature, c.top_p, c.top_k))
                topp = sample_from_logits(expert.masked_fill(~keep, NEG_INF), c.temperature, generator=self.generator)
            else:
                topp = sample_from_logits(expert, c.temperature, c.top_p, c.top_k, self.generator)
            if not self._any_cdk:
                return topp
        if logits.shape[0] < 2:
            raise ValueError("CD-K needs the unconditional stream as its amateur (2 or 3 streams)")
        amateur = restrict(logits[-1].float(), allowed)
        scores = cdk_scores(
            expert, amateur, alpha=c.cdk_alpha, k=c.cdk_k, amateur_temperature=c.cdk_amateur_temperature
        )
        t = c.temperature if c.cdk_temperature is None else c.cdk_temperature
        cdk = sample_from_logits(scores, t, generator=self.generator)
        if topp is None:
            return cdk
        return torch.where(self.cdk_rows.to(cdk.device), cdk, topp)


def mixed_rows(first_index: int, n: int, device=None) -> torch.Tensor:
    """bool [n]: which of the samples first_index .. first_index+n-1 use CD-K in the mixed strategy
    (the odd ones, so that each prompt's consecutive samples split half/half)."""
    return (torch.arange(first_index, first_index + n, device=device) % 2) == 1
