"""Sampling from a CM3Leon model with its KV cache: every decoding strategy of PAPER.md section 5.

Three layers, top-down:

1. Tasks (what users call):
       generate_images(model, vocab, captions_ids, tokens_per_image, decoding=DecodingConfig(...))
       edit_images(...)        instruct-CFG, three streams (editing)
       caption_images(...)     image -> text by infilling `<sentinel:0> ... <eoss>` (captioning, VQA)
       infill_images(...)      regenerate masked runs of image codes
2. `DecodeSession`: S streams x B samples = R rows, each row with its own prompt (any lengths), one
   model forward per step for all rows; the token picked for sample b is fed to all its streams.
3. Pure logit processors and samplers on [B, V] tensors: temperature, top-k, top-p, CFG,
   instruct-CFG, CD-K scores, `Picker` (combines the streams and samples one token per sample).

Guidance, as implemented (streams are ordered conditional first, unconditional last):
- CFG:          expert = uncond + w (cond - uncond)  on raw logits. (Using log-probs instead gives
                the same distribution: each stream's log-softmax shift is a per-row constant.)
                Top-k / top-p then pick the candidates from the guided distribution (truncate_on
                "guided") or from the conditional stream's ("conditional"; sampled by guided probability).
- instruct-CFG: expert = uncond + s_img (img_cond - uncond) + s_txt (full - img_cond).
- CD-K:         on the expert's next-token distribution p_e (softmax of the guided logits, so
                cfg_weight 1 makes it the conditional stream, the paper's formula) and the amateur
                p_a = softmax(uncond / amateur_temperature) (the unconditional stream, as in Meta's
                code): score(t) = log p_e(t) - log p_a(t) on V = {t : p_e(t) >= alpha * kth_largest(p_e)},
                -inf elsewhere; the token is sampled from softmax(score / temperature) (0: argmax).
- mixed:        half the samples (odd global sample index) use CD-K, the others top-p.
Restrictions (image ids only, text ids + <eoss>) are applied to the guided logits and to the
amateur before any softmax, so every distribution is over the allowed ids.

Prompts of different lengths share one batch by left-padding into the cache: row r's prompt fills
cache slots [P - len_r, P) with positions 0..len_r-1; pad slots are masked out of attention. Slots
(cache index, shared by the batch) and positions (position embedding, per row) therefore differ,
which `CM3LeonLM.forward` (shared positions) cannot express; `forward_rows` runs the same modules
with per-row positions. Its parity with the full forward is tested.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cm3leon.data.sequences import Document, document_ids
from cm3leon.model import CM3LeonLM, KVCache
from cm3leon.objective import cm3_apply_spans
from cm3leon.vocab import EOS_ID, PAD_ID, UNK_ID, Vocab

NEG_INF = float("-inf")
STRATEGIES = ("topp", "cdk", "mixed")
TRUNCATE_ON = ("guided", "conditional")


# =============================================================================================
# 3. Logit processors and samplers (pure functions; logits [B, V] unless said otherwise)
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


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + weight * (cond - uncond). [B, V] x2 -> [B, V]."""
    return uncond + weight * (cond - uncond)


def instruct_cfg_logits(full: torch.Tensor, img_cond: torch.Tensor, uncond: torch.Tensor,
                        image_weight: float, text_weight: float) -> torch.Tensor:
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


def cdk_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, *, alpha: float = 0.5, k: int = 5,
               amateur_temperature: float = 0.5) -> torch.Tensor:
    """CD-K scores: log p_e - log p_a on `cdk_candidates`, -inf elsewhere. [B, V] x2 -> float [B, V].

    p_e = softmax(expert_logits), p_a = softmax(amateur_logits / amateur_temperature)."""
    logp_e = expert_logits.float().log_softmax(dim=-1)
    logp_a = (amateur_logits.float() / amateur_temperature).log_softmax(dim=-1)
    keep = cdk_candidates(expert_logits, alpha, k)
    return (logp_e - logp_a).masked_fill(~keep, NEG_INF)


def truncate(logits: torch.Tensor, temperature: float = 1.0, top_p: float | None = None,
             top_k: int | None = None) -> torch.Tensor:
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
    cfg_weight:   classifier-free guidance weight a_c (1.0 = the conditional stream alone).
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
    cfg_weight: float = 1.0
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
        return self.strategy != "topp" or self.cfg_weight != 1.0


class Picker:
    """Combines the streams' logits [S, B, V] into one token per sample [B].

    S = 1: the conditional stream alone; S = 2: (cond, uncond) with CFG; S = 3: (full, img_cond,
    uncond) with instruct-CFG. CD-K's amateur is always the last (unconditional) stream.
    `cdk_rows` (bool [B]) chooses CD-K per sample for the mixed strategy.
    """

    def __init__(self, cfg: DecodingConfig, generator: torch.Generator | None = None,
                 cdk_rows: torch.Tensor | None = None):
        self.cfg, self.generator, self.cdk_rows = cfg, generator, cdk_rows
        # decided once here: a per-step `.any()` would sync the GPU every token
        self._any_cdk = cfg.strategy == "cdk" or (cfg.strategy == "mixed" and cdk_rows is not None
                                                  and bool(cdk_rows.any()))

    def expert(self, logits: torch.Tensor) -> torch.Tensor:
        """Guided logits [B, V] from the streams [S, B, V]."""
        c = self.cfg
        if logits.shape[0] == 1:
            return logits[0]
        if logits.shape[0] == 2:
            return cfg_logits(logits[0], logits[1], c.cfg_weight)
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
                topp = sample_from_logits(expert.masked_fill(~keep, NEG_INF), c.temperature,
                                          generator=self.generator)
            else:
                topp = sample_from_logits(expert, c.temperature, c.top_p, c.top_k, self.generator)
            if not self._any_cdk:
                return topp
        if logits.shape[0] < 2:
            raise ValueError("CD-K needs the unconditional stream as its amateur (2 or 3 streams)")
        amateur = restrict(logits[-1].float(), allowed)
        scores = cdk_scores(expert, amateur, alpha=c.cdk_alpha, k=c.cdk_k,
                            amateur_temperature=c.cdk_amateur_temperature)
        t = c.temperature if c.cdk_temperature is None else c.cdk_temperature
        cdk = sample_from_logits(scores, t, generator=self.generator)
        if topp is None:
            return cdk
        return torch.where(self.cdk_rows.to(cdk.device), cdk, topp)


def mixed_rows(first_index: int, n: int, device=None) -> torch.Tensor:
    """bool [n]: which of the samples first_index .. first_index+n-1 use CD-K in the mixed strategy
    (the odd ones, so that each prompt's consecutive samples split half/half)."""
    return (torch.arange(first_index, first_index + n, device=device) % 2) == 1


# =============================================================================================
# 2. The batched, KV-cached decoding session
# =============================================================================================
class PaddedKVCache(KVCache):
    """A `KVCache` whose rows hold left-padded prompts: row r's valid slots start at `start[r]`.

    attn_mask gives each row its own mask [R, 1, T, S]: a query at slot q sees slots start[r]..q,
    and a pad query sees only itself (so no row is fully masked and pad states stay finite).
    `limit` (an int, or None for the static max_len) cuts keys/values and the mask to the first
    `limit` slots: on CPU attention then costs what has been written, not the whole cache; the
    static form (None) is what a CUDA graph replays.
    """

    def __init__(self, cache: KVCache, start: torch.Tensor):
        self.k, self.v = cache.k, cache.v
        self.batch_size, self.max_len = cache.batch_size, cache.max_len
        self.start = start
        self.limit: int | None = None
        keys = torch.arange(self.max_len, device=start.device)
        self._keys = keys
        self._valid = keys[None, :] >= start[:, None]  # [R, S]
        # the same as an additive mask in the cache's dtype: SDPA would convert a bool mask to this
        # in every layer of every decode step
        self._bias = torch.zeros(self._valid.shape, dtype=cache.k[0].dtype, device=start.device).masked_fill(
            ~self._valid, float("-inf"))  # [R, S]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [R, H, T, hd] at slots input_pos [T]; return k, v [R, H, limit or max_len, hd]."""
        k_all, v_all = super().update(layer, input_pos, k, v)
        if self.limit is None:
            return k_all, v_all
        return k_all[:, :, : self.limit], v_all[:, :, : self.limit]

    def attn_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """input_pos: slots [T] -> bool [R, 1, T, limit or max_len] (an additive float mask of that
        shape for an eager decode step)."""
        if self.limit is not None and input_pos.numel() == 1:
            # eager decode step: the one query is the newest slot (limit - 1), so causality holds
            # for every kept key and the mask is the rows' padding alone (a view: no work per step)
            return self._bias[:, None, None, : self.limit]
        keys, valid = self._keys[: self.limit], self._valid[:, : self.limit]
        causal = keys[None, :] <= input_pos[:, None]  # [T, S]
        own = keys[None, :] == input_pos[:, None]  # [T, S]
        return ((valid[:, None, :] & causal[None]) | own[None])[:, None]


def forward_rows(model: CM3LeonLM, idx: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                 cache: KVCache, last_only: bool = False) -> torch.Tensor:
    """The model's cached forward with per-row positions.

    idx [R, T] tokens, pos [R, T] their position ids, slots [T] the cache slots they are written to
    (shared by the rows) -> logits [R, T, V] (or [R, 1, V] with last_only). Same modules and order as
    `CM3LeonLM.forward`; only the position lookup is per row.
    """
    x = model.tok_emb(idx)  # [R, T, d]
    if model.config.embed_scale != 1.0:
        x = x * model.config.embed_scale
    if model.pos_emb is not None:
        x = x + model.pos_emb(pos)  # [R, T, d]
    x = model.drop(x)
    mask = cache.attn_mask(slots)
    for i, block in enumerate(model.blocks):
        x = block(x, slots, cache, i, mask)
    if last_only:
        x = x[:, -1:]
    return model.lm_head(model.ln_f(x))


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class DecodeSession:
    """Prefill R = S x B prompts once, then decode one token per step for all rows in one forward.

    prompts are stream-major: prompts[s * B + b] is stream s of sample b. After construction and
    after each `feed`, `logits` holds the next-token logits float [S, B, V].

    Args:
        model: a CM3LeonLM (eval mode; run under torch.no_grad / inference_mode).
        prompts: R id sequences, any lengths (left-padded internally).
        n_streams: S.
        max_new_tokens: tokens that will be fed after the prompt (sizes the static cache).
        static: attend over the whole preallocated cache every step (fixed shapes; implied by
            cuda_graph and compile). Default: over the slots written so far (faster eager).
        cuda_graph: capture the decode step as a CUDA graph (CUDA only; static shapes make it legal).
        compile: torch.compile the decode step (GPU: pair it with cuda_graph).
    """

    def __init__(self, model: CM3LeonLM, prompts: Sequence[Sequence[int]], n_streams: int = 1,
                 max_new_tokens: int = 0, *, static: bool = False, cuda_graph: bool = False,
                 compile: bool = False):
        R = len(prompts)
        if R == 0 or R % n_streams:
            raise ValueError(f"{R} prompts cannot be split into {n_streams} streams")
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token (the zero-shot prompt starts with </s>)")
        self.model, self.S, self.B = model, n_streams, R // n_streams
        device = model.tok_emb.weight.device
        self.device = device
        lens = torch.tensor([len(p) for p in prompts], device=device)
        P = int(lens.max())
        if P + max_new_tokens > model.config.max_seq_len:
            raise ValueError(f"prompt ({P}) + new tokens ({max_new_tokens}) exceed model.max_seq_len="
                             f"{model.config.max_seq_len}")
        idx = torch.full((R, P), PAD_ID, dtype=torch.long)
        for r, p in enumerate(prompts):
            idx[r, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        idx = idx.to(device)
        start = P - lens  # [R]
        pos = (torch.arange(P, device=device)[None, :] - start[:, None]).clamp(min=0)  # [R, P]
        max_len = min(_round_up(P + max_new_tokens, 8), model.config.max_seq_len)  # aligned mask rows
        self.cache = PaddedKVCache(model.new_cache(R, max_len), start)
        self.max_new_tokens, self._P = max_new_tokens, P
        # keys cut to the written slots on the eager path; static shapes for a graph or a compiled step
        self.dynamic = not (static or cuda_graph or compile)
        self.cache.limit = P if self.dynamic else None
        logits = forward_rows(model, idx, pos, torch.arange(P, device=device), self.cache, last_only=True)
        self.logits = logits[:, -1].float().view(self.S, self.B, -1)
        # decode-step state as static buffers (a CUDA graph replays reads/writes at fixed addresses)
        self._idx = torch.zeros(R, 1, dtype=torch.long, device=device)
        self._pos = lens[:, None].clone()  # next position per row [R, 1]
        self._slot = torch.tensor([P], device=device)  # next cache slot [1]
        self.n_fed = 0
        self._step = self._decode_step
        if compile:
            self._step = torch.compile(self._decode_step, dynamic=False)
        self._graph = None
        if cuda_graph:
            if device.type != "cuda":
                raise ValueError("cuda_graph=True needs the model on a CUDA device")
            self._capture()

    def _decode_step(self) -> torch.Tensor:
        """One token per row from the static buffers -> logits [R, V]."""
        return forward_rows(self.model, self._idx, self._pos, self._slot, self.cache, last_only=True)[:, -1]

    def _capture(self) -> None:
        """Warm up on a side stream, then capture `_decode_step` into a CUDA graph. The warm-up writes
        the next slot, which the first real step overwrites before anything reads it."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._graph_out = self._step()

    def feed(self, tokens: torch.Tensor) -> None:
        """Append tokens [B] (sample b's token to each of its S streams) and compute the next logits."""
        if self.n_fed >= self.max_new_tokens:  # a Python counter: no device sync per step
            raise ValueError(f"DecodeSession: fed more than max_new_tokens={self.max_new_tokens} tokens")
        self._idx.copy_(tokens.to(self.device, torch.long).repeat(self.S)[:, None])
        if self._graph is not None:
            self._graph.replay()
            logits = self._graph_out
        else:
            self.cache.limit = self._P + self.n_fed + 1 if self.dynamic else None
            logits = self._step()
        self.logits = logits.float().view(self.S, self.B, -1)
        self._pos += 1
        self._slot += 1
        self.n_fed += 1

    def feed_same(self, token_id: int) -> None:
        """Append the same token to every row (e.g. <break>, <eoss>, <sentinel:i>)."""
        self.feed(torch.full((self.B,), int(token_id), dtype=torch.long, device=self.device))


def sample_fixed(session: DecodeSession, picker: Picker, n_tokens: int, allowed: torch.Tensor | None,
                 then_feed: bool = False) -> torch.Tensor:
    """Sample exactly n_tokens per sample -> ids [B, n_tokens]. The last one is fed to the session
    only when `then_feed` (the caller continues the sequence)."""
    out = torch.empty(session.B, n_tokens, dtype=torch.long, device=session.device)
    for t in range(n_tokens):
        tok = picker(session.logits, allowed)
        out[:, t] = tok
        if then_feed or t + 1 < n_tokens:
            session.feed(tok)
    return out


def sample_until(session: DecodeSession, picker: Picker, stop_id: int, max_len: int,
                 allowed: torch.Tensor | None) -> list[list[int]]:
    """Sample per sample until `stop_id` or max_len tokens -> B id lists (stop token excluded).
    Finished samples keep emitting stop_id (not returned) until all are done."""
    done = torch.zeros(session.B, dtype=torch.bool, device=session.device)
    steps = []
    for t in range(max_len):
        tok = torch.where(done, stop_id, picker(session.logits, allowed))
        steps.append(tok)
        done |= tok == stop_id
        if bool(done.all()) or t + 1 == max_len:
            break
        session.feed(tok)
    ids = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(session.B)]
    return [row[: row.index(stop_id)] if stop_id in row else row for row in ids]


# =============================================================================================
# Prompts
# =============================================================================================
def retrieved_prefix(retrieved: Sequence[Document] | None, vocab: Vocab) -> list[int]:
    """`</s> T1 <break> I1 <break> ... ` : the retrieved documents before the query (sequences.py)."""
    out = [EOS_ID]
    for d in retrieved or ():
        out += document_ids(d, vocab, image_first=False).tolist() + [vocab.break_id]
    return out


def text_to_image_prompt(text_ids, vocab: Vocab, retrieved: Sequence[Document] | None = None) -> list[int]:
    """The zero-shot prompt `</s> [retrieved docs] caption <break>` as ids."""
    return retrieved_prefix(retrieved, vocab) + [*map(int, text_ids), vocab.break_id]


def unconditional_prompt(vocab: Vocab, retrieved: Sequence[Document] | None = None) -> list[int]:
    """CFG's unconditional stream `</s> [retrieved docs] <sentinel:0> <break>` (the caption dropped)."""
    return retrieved_prefix(retrieved, vocab) + [vocab.sentinel_id(0), vocab.break_id]


def infill_prompt(ids, spans: Sequence[tuple[int, int]], vocab: Vocab) -> list[int]:
    """CM3 infilling prompt: mask `spans` of `ids` (cm3_apply_spans) and stop right after the first
    appended `<sentinel:0>`, where the model writes span 0 up to `<eoss>`. What the spans hold in
    `ids` is irrelevant (a placeholder)."""
    ex = cm3_apply_spans(np.asarray(ids, dtype=np.int64), spans, vocab, truncate=False)
    out = ex.ids.tolist()
    s0 = vocab.sentinel_id(0)
    first = out.index(s0)
    return out[: out.index(s0, first + 1) + 1]


def image_region_spans(grid: int, top: int, left: int, bottom: int, right: int) -> list[tuple[int, int]]:
    """Row-major code spans [(start, end), ...] of the rectangle rows [top, bottom) x cols [left, right)
    of a grid x grid code map (one span per row; merged when the rectangle spans whole rows)."""
    if not (0 <= top < bottom <= grid and 0 <= left < right <= grid):
        raise ValueError(f"region ({top}, {left}, {bottom}, {right}) is not inside the {grid}x{grid} code grid")
    if left == 0 and right == grid:
        return [(top * grid, bottom * grid)]
    return [(r * grid + left, r * grid + right) for r in range(top, bottom)]


# =============================================================================================
# 1. Tasks
# =============================================================================================
def _device(model: CM3LeonLM) -> torch.device:
    return model.tok_emb.weight.device


def _generator(model: CM3LeonLM, seed: int, generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator(device=_device(model)).manual_seed(seed)


def _chunks(n: int, size: int | None):
    size = n if not size else size
    for s in range(0, n, size):
        yield s, min(n, s + size)


@torch.inference_mode()
def generate(
    model: CM3LeonLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    allowed_range: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Plain sampling of continuations: prompt [B, P] -> new tokens [B, max_new_tokens]."""
    session = DecodeSession(model, prompt.tolist(), 1, max_new_tokens)
    allowed = None if allowed_range is None else id_mask(model.config.vocab_size, [allowed_range], _device(model))
    picker = Picker(DecodingConfig(temperature=temperature, top_p=top_p, top_k=top_k), generator)
    return sample_fixed(session, picker, max_new_tokens, allowed)


@torch.inference_mode()
def generate_images(
    model: CM3LeonLM,
    vocab: Vocab,
    captions_ids: Sequence,
    tokens_per_image: int,
    *,
    decoding: DecodingConfig | None = None,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int = 0,
    retrieved: Sequence[Sequence[Document]] | None = None,
    batch_size: int | None = None,
    then_break: bool = False,
    generator: torch.Generator | None = None,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Text to image: image codes [N, tokens_per_image] for N captions (BPE id arrays).

    decoding: the recipe (default: DecodingConfig(temperature=temperature, top_p=top_p)).
    retrieved: per caption the documents to put before it (the unconditional stream keeps them).
    batch_size: samples per forward (default all); prompts of any lengths share a batch.
    then_break: return [N, tokens_per_image + 1] ids instead, with the `<break>` that continues the
        sequence appended (vocabulary ids, not codes) and fed to the model.
    Exactly tokens_per_image tokens are sampled per image, restricted to the image-code ids.
    """
    dec = decoding or DecodingConfig(temperature=temperature, top_p=top_p)
    device = _device(model)
    gen = _generator(model, seed, generator)
    allowed = id_mask(model.config.vocab_size, [vocab.image_id_range], device)
    N = len(captions_ids)
    out = torch.empty(N, tokens_per_image + int(then_break), dtype=torch.long)
    for s, e in _chunks(N, batch_size):
        docs = [retrieved[i] if retrieved is not None else None for i in range(s, e)]
        prompts = [text_to_image_prompt(captions_ids[i], vocab, docs[i - s]) for i in range(s, e)]
        if dec.needs_uncond:
            prompts += [unconditional_prompt(vocab, d) for d in docs]
        session = DecodeSession(model, prompts, 2 if dec.needs_uncond else 1,
                                tokens_per_image + int(then_break), cuda_graph=cuda_graph)
        picker = Picker(dec, gen, mixed_rows(s, e - s, device))
        ids = sample_fixed(session, picker, tokens_per_image, allowed, then_feed=then_break)
        if then_break:
            session.feed_same(vocab.break_id)
            out[s:e] = torch.cat([ids, torch.full_like(ids[:, :1], vocab.break_id)], 1).cpu()
        else:
            out[s:e] = vocab.ids_to_codes(ids).cpu()
    return out


def edit_prompts(prefix_ids, source_codes, instruction_ids, vocab: Vocab) -> tuple[list[int], list[int], list[int]]:
    """The three instruct-CFG streams for the editing template (PAPER.md section 7):
    full     `</s> prefix <break> I_src <break> instruction <break>`
    img_cond `</s> prefix <break> I_src <break> <sentinel:0> <break>`   (instruction dropped)
    uncond   `</s> <sentinel:0> <break>`                                 (everything dropped)"""
    head = [EOS_ID, *map(int, prefix_ids), vocab.break_id, *vocab.codes_to_ids(np.asarray(source_codes)).tolist(),
            vocab.break_id]
    full = head + [*map(int, instruction_ids), vocab.break_id]
    img_cond = head + [vocab.sentinel_id(0), vocab.break_id]
    return full, img_cond, unconditional_prompt(vocab)


@torch.inference_mode()
def edit_images(
    model: CM3LeonLM,
    vocab: Vocab,
    prefix_ids,
    source_codes: torch.Tensor,
    instructions_ids: Sequence,
    *,
    decoding: DecodingConfig | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Image editing with instruct-CFG (three streams per sample: full, image-only, unconditional).

    source_codes [N, hw] and N instructions (BPE ids) -> edited codes [N, hw]. Weights:
    decoding.image_weight / text_weight (paper 1.5 / 7.5)."""
    dec = decoding or DecodingConfig()
    source_codes = torch.as_tensor(source_codes)
    N, hw = source_codes.shape
    if len(instructions_ids) != N:
        raise ValueError(f"edit_images: {N} source images but {len(instructions_ids)} instructions")
    streams = [edit_prompts(prefix_ids, source_codes[i], instructions_ids[i], vocab) for i in range(N)]
    prompts = [s[j] for j in range(3) for s in streams]  # stream-major
    session = DecodeSession(model, prompts, 3, hw)
    picker = Picker(dec, _generator(model, seed, generator), mixed_rows(0, N, _device(model)))
    allowed = id_mask(model.config.vocab_size, [vocab.image_id_range], _device(model))
    return vocab.ids_to_codes(sample_fixed(session, picker, hw, allowed)).cpu()


def _query_doc(text_before, text_after, codes, vocab: Vocab, image_first: bool, placeholder_len: int = 1):
    """`text_before <span> text_after <break> I` (or the image first) and the span's (start, end)."""
    text = [*map(int, text_before)] + [UNK_ID] * placeholder_len + [*map(int, text_after)]
    image = vocab.codes_to_ids(np.asarray(codes, dtype=np.int64)).tolist()
    if image_first:
        start = len(image) + 1 + len(text_before)
        return image + [vocab.break_id] + text, (start, start + placeholder_len)
    start = len(text_before)
    return text + [vocab.break_id] + image, (start, start + placeholder_len)


@torch.inference_mode()
def caption_images(
    model: CM3LeonLM,
    vocab: Vocab,
    codes: torch.Tensor,
    *,
    text_before: Sequence[int] = (),
    text_after: Sequence[int] = (),
    max_len: int = 48,
    temperature: float = 0.0,
    top_p: float | None = None,
    image_first: bool = False,
    retrieved: Sequence[Sequence[Document]] | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Image -> text by infilling: the text span is masked and generated after `<sentinel:0>` until
    `<eoss>` (at most max_len tokens), only text ids (and <eoss>) allowed.

    Layout (caption first, the main training order): `</s> text_before <sentinel:0> text_after
    <break> I </s> <sentinel:0>` -> answer. Captioning: no text around the span (or a task prefix such
    as "Describe the given picture."); VQA: text_before "Question: {q} Answer:", text_after ".".
    codes [N, hw] -> N lists of BPE ids. temperature 0 is greedy.
    """
    codes = torch.as_tensor(codes)
    prompts = []
    for i in range(codes.shape[0]):
        doc, span = _query_doc(text_before, text_after, codes[i], vocab, image_first)
        prefix = retrieved_prefix(retrieved[i] if retrieved is not None else None, vocab)
        seq = prefix + doc + [EOS_ID]
        prompts.append(infill_prompt(seq, [(span[0] + len(prefix), span[1] + len(prefix))], vocab))
    session = DecodeSession(model, prompts, 1, max_len)
    picker = Picker(DecodingConfig(temperature=temperature, top_p=top_p), _generator(model, seed, generator))
    allowed = id_mask(model.config.vocab_size, [(UNK_ID + 1, vocab.text_size), (vocab.eoss_id, vocab.eoss_id + 1)],
                      _device(model))
    return sample_until(session, picker, vocab.eoss_id, max_len, allowed)


@torch.inference_mode()
def infill_images(
    model: CM3LeonLM,
    vocab: Vocab,
    codes: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    *,
    text_ids: Sequence | None = None,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Regenerate the code spans [(start, end), ...] (row-major code indices; see
    `image_region_spans`) of each image: codes [N, hw] -> codes [N, hw], outside the spans unchanged.

    Sequence `</s> [caption <break>] I </s>` with the spans masked by CM3 (`<sentinel:i>`); span i is
    written after `<sentinel:i>` with exactly its length in image ids, then `<eoss> <sentinel:i+1>`
    is fed. text_ids: optional caption per image (N BPE id arrays)."""
    codes = torch.as_tensor(codes).long()
    N, hw = codes.shape
    spans = sorted((int(s), int(e)) for s, e in spans)
    if not spans or any(not 0 <= s < e <= hw for s, e in spans):
        raise ValueError(f"infill_images: spans {spans} must be non-empty and inside [0, {hw})")
    prompts = []
    for i in range(N):
        text = [] if text_ids is None else [*map(int, text_ids[i]), vocab.break_id]
        off = 1 + len(text)
        seq = [EOS_ID] + text + vocab.codes_to_ids(codes[i]).tolist() + [EOS_ID]
        prompts.append(infill_prompt(seq, [(s + off, e + off) for s, e in spans], vocab))
    total = sum(e - s for s, e in spans) + 2 * (len(spans) - 1)
    session = DecodeSession(model, prompts, 1, total)
    picker = Picker(DecodingConfig(temperature=temperature, top_p=top_p, top_k=top_k), _generator(model, seed, generator))
    allowed = id_mask(model.config.vocab_size, [vocab.image_id_range], _device(model))
    out = codes.clone()
    for j, (s, e) in enumerate(spans):
        last = j + 1 == len(spans)
        ids = sample_fixed(session, picker, e - s, allowed, then_feed=not last)
        out[:, s:e] = vocab.ids_to_codes(ids).cpu()
        if not last:
            session.feed_same(vocab.eoss_id)
            session.feed_same(vocab.sentinel_id(j + 1))
    return out

