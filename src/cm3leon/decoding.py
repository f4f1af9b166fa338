"""Sampling from a CM3Leon model with its KV cache (PAPER.md section 5).

`generate` prefills the prompt once, then decodes one token per step from the static cache.
`generate_images` builds the zero-shot text-to-image prompt `</s> caption <break>` and samples
exactly `tokens_per_image` tokens restricted to the image-code ids.
"""

from __future__ import annotations

import numpy as np
import torch

from cm3leon.model import CM3LeonLM
from cm3leon.vocab import EOS_ID, Vocab


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches `top_p`: [B, V] -> [B, V]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> sampled ids [B]; temperature 0 means greedy."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def restrict_to_range(logits: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """-inf outside ids [lo, hi): [B, V] -> [B, V]."""
    out = torch.full_like(logits, float("-inf"))
    out[:, lo:hi] = logits[:, lo:hi]
    return out


@torch.no_grad()
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
    """Sample continuations of equal-length prompts: prompt [B, P] -> new tokens [B, max_new_tokens]."""
    B, P = prompt.shape
    cache = model.new_cache(B, max_len=P + max_new_tokens)
    logits = model(prompt, input_pos=torch.arange(P, device=prompt.device), cache=cache)[:, -1]
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=prompt.device)
    for t in range(max_new_tokens):
        if allowed_range is not None:
            logits = restrict_to_range(logits, *allowed_range)
        nxt = sample_from_logits(logits, temperature, top_p, top_k, generator)
        out[:, t] = nxt
        if t + 1 < max_new_tokens:
            pos = torch.tensor([P + t], device=prompt.device)
            logits = model(nxt[:, None], input_pos=pos, cache=cache)[:, -1]
    return out


def text_to_image_prompt(text_ids, vocab: Vocab) -> list[int]:
    """The zero-shot prompt `</s> caption <break>` as ids."""
    return [EOS_ID, *map(int, text_ids), vocab.break_id]


@torch.no_grad()
def generate_images(
    model: CM3LeonLM,
    vocab: Vocab,
    captions_ids: list,
    tokens_per_image: int,
    *,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Image codes [N, tokens_per_image] for N captions (BPE id arrays), prompts of equal length batched."""
    device = next(model.parameters()).device
    prompts = [text_to_image_prompt(t, vocab) for t in captions_ids]
    codes = torch.empty(len(prompts), tokens_per_image, dtype=torch.long)
    gen = torch.Generator(device=device).manual_seed(seed)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for idx in by_len.values():
        batch = torch.tensor(np.array([prompts[i] for i in idx]), device=device)
        ids = generate(
            model, batch, tokens_per_image, temperature=temperature, top_p=top_p,
            allowed_range=vocab.image_id_range, generator=gen,
        )
        codes[idx] = vocab.ids_to_codes(ids).cpu()
    return codes
