"""Generation tasks on a CM3Leon model: what users, evaluation and callbacks call.

    generate_images(model, vocab, captions_ids, tokens_per_image, decoding=DecodingConfig(...))
    edit_images(...)        instruct-CFG, three streams (editing)
    caption_images(...)     image -> text by infilling `<sentinel:0> ... <eoss>` (captioning, VQA)
    infill_text(...)        the same from ready prompts, one per row (the SFT tasks, `generation.sft`)
    infill_images(...)      regenerate masked runs of image codes
    generate(...)           plain continuation of id prompts

Each task lays out its prompts with `cm3leon.data.sequences` (the training layout), runs one
`DecodeSession` (the model's own forward with its KV cache) and picks tokens with a `Picker`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cm3leon.data.sequences import (
    Document,
    caption_prompt,
    edit_prompts,
    image_infill_prompt,
    text_to_image_prompt,
    unconditional_prompt,
)
from cm3leon.generation.sampling import DecodingConfig, Picker, id_mask, mixed_rows
from cm3leon.generation.session import DecodeSession, sample_fixed, sample_until
from cm3leon.model import CM3LeonLM
from cm3leon.vocab import UNK_ID, Vocab


def image_region_spans(grid: int, top: int, left: int, bottom: int, right: int) -> list[tuple[int, int]]:
    """Row-major code spans [(start, end), ...] of the rectangle rows [top, bottom) x cols [left, right)
    of a grid x grid code map (one span per row; merged when the rectangle spans whole rows)."""
    if not (0 <= top < bottom <= grid and 0 <= left < right <= grid):
        raise ValueError(f"region ({top}, {left}, {bottom}, {right}) is not inside the {grid}x{grid} code grid")
    if left == 0 and right == grid:
        return [(top * grid, bottom * grid)]
    return [(r * grid + left, r * grid + right) for r in range(top, bottom)]


def _device(model: CM3LeonLM) -> torch.device:
    return model.tok_emb.weight.device


def _generator(model: CM3LeonLM, seed: int, generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator(device=_device(model)).manual_seed(seed)


def _chunks(n: int, size: int | None):
    size = size if size else n
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


def _chunk_progress(progress: Callable[[int, int], None], done: int, rows: int, total: int) -> Callable[[int], None]:
    """sample_fixed's on_step for one chunk of `rows` samples, after `done` image tokens of `total`."""
    return lambda t: progress(done + t * rows, total)


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
    progress: Callable[[int, int], None] | None = None,
    progress_every: int = 32,
) -> torch.Tensor:
    """Text to image: image codes [N, tokens_per_image] for N captions (BPE id arrays).

    decoding: the recipe (default: DecodingConfig(temperature=temperature, top_p=top_p)).
    retrieved: per caption the documents to put before it (the unconditional stream keeps them).
    batch_size: samples per forward (default all); prompts of any lengths share a batch.
    then_break: return [N, tokens_per_image + 1] ids instead, with the `<break>` that continues the
        sequence appended (vocabulary ids, not codes) and fed to the model.
    progress: called as progress(image tokens done, total = N * tokens_per_image) every
        `progress_every` decode steps (e.g. a tqdm bar's update; None: no progress, the default).
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
        session = DecodeSession(
            model, prompts, 2 if dec.needs_uncond else 1, tokens_per_image + int(then_break), cuda_graph=cuda_graph
        )
        picker = Picker(dec, gen, mixed_rows(s, e - s, device))
        on_step = (
            None if progress is None else _chunk_progress(progress, s * tokens_per_image, e - s, N * tokens_per_image)
        )
        ids = sample_fixed(
            session, picker, tokens_per_image, allowed, then_feed=then_break, on_step=on_step, every=progress_every
        )
        if then_break:
            session.feed_same(vocab.break_id)
            out[s:e] = torch.cat([ids, torch.full_like(ids[:, :1], vocab.break_id)], 1).cpu()
        else:
            out[s:e] = vocab.ids_to_codes(ids).cpu()
    return out


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
    retrieved: Sequence[Sequence[Document]] | None = None,
) -> torch.Tensor:
    """Image editing with instruct-CFG (three streams per sample: full, image-only, unconditional).

    source_codes [N, hw] and N instructions (BPE ids) -> edited codes [N, hw]. Weights:
    decoding.image_weight / text_weight (paper 1.5 / 7.5). retrieved: per sample, documents put
    before each of its streams (`edit_prompts`)."""
    dec = decoding or DecodingConfig()
    source_codes = torch.as_tensor(source_codes)
    N, hw = source_codes.shape
    if len(instructions_ids) != N:
        raise ValueError(f"edit_images: {N} source images but {len(instructions_ids)} instructions")
    docs = retrieved if retrieved is not None else [()] * N
    streams = [edit_prompts(prefix_ids, source_codes[i], instructions_ids[i], vocab, docs[i]) for i in range(N)]
    prompts = [s[j] for j in range(3) for s in streams]  # stream-major
    session = DecodeSession(model, prompts, 3, hw)
    picker = Picker(dec, _generator(model, seed, generator), mixed_rows(0, N, _device(model)))
    allowed = id_mask(model.config.vocab_size, [vocab.image_id_range], _device(model))
    return vocab.ids_to_codes(sample_fixed(session, picker, hw, allowed)).cpu()


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
    prompts = [
        caption_prompt(
            codes[i], vocab, text_before, text_after, image_first, retrieved[i] if retrieved is not None else None
        )
        for i in range(codes.shape[0])
    ]
    return infill_text(
        model, vocab, prompts, max_len=max_len, temperature=temperature, top_p=top_p, seed=seed, generator=generator
    )


@torch.inference_mode()
def infill_text(
    model: CM3LeonLM,
    vocab: Vocab,
    prompts: Sequence[Sequence[int]],
    *,
    max_len: int = 48,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The text span of infilling prompts ending in `<sentinel:0>` (`caption_prompt`, or
    `sft_templates.sft_prompt` of a text-target sample: one prompt per row, any lengths), generated
    until `<eoss>` (at most max_len tokens; text ids and <eoss> only) -> N lists of BPE ids."""
    session = DecodeSession(model, prompts, 1, max_len)
    picker = Picker(DecodingConfig(temperature=temperature, top_p=top_p), _generator(model, seed, generator))
    allowed = id_mask(
        model.config.vocab_size, [(UNK_ID + 1, vocab.text_size), (vocab.eoss_id, vocab.eoss_id + 1)], _device(model)
    )
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
    prompts = [image_infill_prompt(codes[i], spans, vocab, None if text_ids is None else text_ids[i]) for i in range(N)]
    total = sum(e - s for s, e in spans) + 2 * (len(spans) - 1)
    session = DecodeSession(model, prompts, 1, total)
    picker = Picker(
        DecodingConfig(temperature=temperature, top_p=top_p, top_k=top_k), _generator(model, seed, generator)
    )
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
