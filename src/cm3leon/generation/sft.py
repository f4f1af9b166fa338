"""Instruction-tuned (SFT) tasks through the one generation pipeline (PAPER.md sections 5 and 7).

    pipe = load_pipeline(ckpt)
    req = edit_request("make the red circle blue")                     # an SftSample, target left empty
    images = sft_generate(pipe, [req], [{"image1": photo}], decoding=DecodingConfig(top_p=0.3))
    answers = sft_generate(pipe, [vqa_request("What colour is the circle?")], [{"image": photo}])

`src/generate.py` (task=edit|control|grounded|vqa|caption) and the SFT evaluation
(`cm3leon.eval.sft`) both call `sft_generate`; it takes `SftSample`s (the world's, or requests
made from a command line by the `*_request` builders) and the input images per template slot.

Prompts are `sft_templates`' own (`generation_inputs`, `sft_prompt`): the training sequence cut
where the target starts, so training and inference cannot drift. Decoding is
`cm3leon.generation.tasks`'. Streams and guidance per task:
- edit: instruct-CFG (`tasks.edit_images`), three streams per sample: full
  `</s> Edit first image ... <break> I_src <break> instruction <break>`, image-only (the
  instruction replaced by `<sentinel:0>`) and unconditional `</s> <sentinel:0> <break>`; weights
  decoding.image_weight / text_weight (paper: 1.5 / 7.5).
- control: CFG with decoding.guidance_scale (paper: 3 for structure-guided tasks); the
  unconditional stream keeps the task prefix and the control image, like retrieved documents
  (PAPER.md section 5), and drops the caption: guidance amplifies the caption (colours,
  background), which the control map does not carry.
- grounded: CFG; everything is one text segment, so the unconditional stream is
  `</s> <sentinel:0> <break>` (caption and boxes dropped).
- vqa, caption: infilling (`tasks.infill_text`): the answer after `<sentinel:0>` until `<eoss>`,
  no guidance, greedy by default; the decoded text goes through `clean_answer`.
Retrieval: a pipeline with a retriever (a checkpoint fine-tuned with `retrieval.k > 0`, or
`retrieval.k=K retrieval.dir=BANK`) retrieves by each prompt's text (`retrieval_query`, as SFT
training does) and puts the documents first, in every stream.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from cm3leon.data.sequences import Document
from cm3leon.data.sft_templates import (
    CONTROL_KINDS,
    GROUNDING_GRID,
    IMAGE_SLOTS,
    Box,
    SftSample,
    clean_answer,
    generation_inputs,
    retrieval_query,
    sft_prompt,
)
from cm3leon.generation import tasks
from cm3leon.generation.sampling import DecodingConfig

# The template slot a task's input image goes to (grounded has none).
INPUT_SLOT = {"edit": "image1", "control": "control image", "vqa": "image", "caption": "image"}
VQA_TEMPLATES = ("vqa", "vqa_short", "vqa_image_first")
# "red circle at (3, 3) -> (83, 83)": one object of the grounded template (format_objects' form)
_OBJECT_RE = re.compile(r"\s*(.+?)\s+at\s+\(\s*(\d+),\s*(\d+)\)\s*->\s*\(\s*(\d+),\s*(\d+)\)\s*")


# ---- requests: SftSamples made from user inputs, the target left empty ----------------------
def edit_request(instruction: str) -> SftSample:
    return SftSample("edit", {"instruction": _text("instruction", instruction)})


def control_request(kind: str, caption: str) -> SftSample:
    if kind not in CONTROL_KINDS:
        raise ValueError(f"control kind {kind!r} is not one of {CONTROL_KINDS}")
    return SftSample("control", {"kind": kind, "caption": _text("caption", caption)})


def grounded_request(caption: str, objects) -> SftSample:
    """objects: see `parse_objects`."""
    return SftSample("grounded", {"caption": _text("caption", caption)}, objects=parse_objects(objects))


def vqa_request(question: str, template: str = "vqa") -> SftSample:
    if template not in VQA_TEMPLATES:
        raise ValueError(f"VQA template {template!r} is not one of {VQA_TEMPLATES}")
    return SftSample(template, {"q": _text("question", question), "a": ""})


def caption_request(describe: bool = False) -> SftSample:
    """Plain captioning, or the "Describe the given picture." template."""
    return SftSample("caption_describe" if describe else "caption", {"caption": ""})


def _text(what: str, value) -> str:
    if value is None or not str(value).strip():
        raise ValueError(f"the {what} is empty")
    return str(value).strip()


def parse_objects(objects) -> tuple[tuple[str, Box], ...]:
    """Grounded objects -> ((name, (x1, y1, x2, y2)), ...) on the 256 grid, checked.

    Accepts the template's own text ("red circle at (3, 3) -> (83, 83), blue square at ...") or a
    list of [name, x1, y1, x2, y2] (or (name, (x1, y1, x2, y2))). A box covers x1 <= x < x2,
    y1 <= y < y2; ValueError naming the bad object."""
    if isinstance(objects, str):
        items = []
        for p in re.split(r"(?<=\))\s*,", objects):  # objects are joined by ", " after their box
            m = _OBJECT_RE.fullmatch(p)
            if not m:
                raise ValueError(f"grounded object {p.strip()!r} is not 'NAME at (x1, y1) -> (x2, y2)'")
            items.append([m.group(1), *map(int, m.groups()[1:])])
        objects = items
    out = []
    for obj in objects or ():
        obj = list(obj)
        if len(obj) == 2 and not isinstance(obj[1], int | str):
            obj = [obj[0], *obj[1]]
        if len(obj) != 5:
            raise ValueError(f"grounded object {obj} is not [name, x1, y1, x2, y2]")
        name, box = str(obj[0]).strip(), obj[1:]
        try:
            x1, y1, x2, y2 = (int(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"grounded object {obj}: the box corners must be integers") from None
        if not name or not (0 <= x1 < x2 <= GROUNDING_GRID and 0 <= y1 < y2 <= GROUNDING_GRID):
            raise ValueError(
                f"grounded object {obj}: needs a name and 0 <= x1 < x2 <= {GROUNDING_GRID}, "
                f"0 <= y1 < y2 <= {GROUNDING_GRID} (corners on the {GROUNDING_GRID} grid)"
            )
        out.append((name, (x1, y1, x2, y2)))
    if not out:
        raise ValueError("the grounded template needs at least one object with its box")
    return tuple(out)


# ---- the tasks ---------------------------------------------------------------------------------
def input_slots(sample: SftSample) -> tuple[str, ...]:
    """The image slots a sample's prompt reads (every slot but an image target)."""
    from cm3leon.data.sft_templates import TEMPLATES

    return tuple(s for s in IMAGE_SLOTS if "{" + s + "}" in TEMPLATES[sample.template] and s != sample.target)


def encode_slots(image_tokenizer, images: Sequence[Mapping[str, object]]) -> list[dict[str, np.ndarray]]:
    """Per sample {slot: image (PIL or uint8 [H, W, 3])} -> {slot: codes int64 [hw]}, one batched encode."""
    flat = [(i, slot, im) for i, d in enumerate(images) for slot, im in d.items()]
    out: list[dict[str, np.ndarray]] = [{} for _ in images]
    if flat:
        codes = image_tokenizer.encode([im for _, _, im in flat]).numpy()
        for (i, slot, _), c in zip(flat, codes):
            out[i][slot] = c
    return out


def _checked_codes(sample: SftSample, codes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [s for s in input_slots(sample) if s not in codes]
    if missing:
        raise ValueError(f"SFT sample {sample.name} ({sample.template}) needs images for {missing}")
    out = dict(codes)
    if sample.target in IMAGE_SLOTS:
        out[sample.target] = np.zeros(0, dtype=np.int64)  # the slot being generated: never read
    return out


def _generator(model, seed: int, generator: torch.Generator | None) -> torch.Generator:
    device = model.tok_emb.weight.device
    return generator if generator is not None else torch.Generator(device=device).manual_seed(int(seed))


def _chunks(n: int, size: int | None):
    size = int(size) if size else max(n, 1)
    for s in range(0, n, size):
        yield s, min(n, s + size)


def sft_images(
    model,
    vocab,
    encode,
    samples: Sequence[SftSample],
    codes: Sequence[Mapping[str, np.ndarray]],
    tokens_per_image: int,
    *,
    decoding: DecodingConfig | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    retrieved: Sequence[Sequence[Document]] | None = None,
) -> torch.Tensor:
    """Image-target samples (edit, control, grounded, text) -> codes int64 [N, tokens_per_image].

    codes: per sample {slot: codes [hw]} of its input slots. batch_size: samples per forward (each
    carries its 1-3 streams; default all). retrieved: per sample, documents before its prompt
    (`sft_retrieved`). See the module docstring for the streams."""
    if len(samples) != len(codes):
        raise ValueError(f"sft_images: {len(samples)} samples but {len(codes)} code sets")
    dec = decoding or DecodingConfig()
    gen = _generator(model, seed, generator)
    out = torch.empty(len(samples), tokens_per_image, dtype=torch.long)
    inputs = [generation_inputs(s, encode, _checked_codes(s, c)) for s, c in zip(samples, codes)]
    docs = [list(d) for d in retrieved] if retrieved is not None else [[] for _ in samples]
    edits = [i for i, s in enumerate(samples) if s.task == "edit"]
    others = [i for i, s in enumerate(samples) if s.task != "edit"]
    for s, e in _chunks(len(edits), batch_size):
        rows = edits[s:e]
        prefix = inputs[rows[0]][1][0].text_ids  # the template's task prefix: the same for every edit
        source = torch.stack([torch.as_tensor(inputs[i][1][0].codes) for i in rows])
        out[rows] = tasks.edit_images(
            model,
            vocab,
            prefix,
            source,
            [inputs[i][0] for i in rows],
            decoding=dec,
            generator=gen,
            retrieved=[docs[i] for i in rows],
        )
    if others:
        out[others] = tasks.generate_images(
            model,
            vocab,
            [inputs[i][0] for i in others],
            tokens_per_image,
            decoding=dec,
            # the retrieved documents, then the template's own (control: the prefix and control image, kept by CFG)
            retrieved=[docs[i] + inputs[i][1] for i in others],
            batch_size=batch_size,
            generator=gen,
        )
    return out


def sft_texts(
    model,
    vocab,
    encode,
    samples: Sequence[SftSample],
    codes: Sequence[Mapping[str, np.ndarray]],
    *,
    max_len: int = 32,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    retrieved: Sequence[Sequence[Document]] | None = None,
) -> list[list[int]]:
    """Text-target samples (vqa, caption) -> the infilled span per sample (BPE ids, `<eoss>` cut);
    retrieved: per sample, documents before its prompt."""
    if len(samples) != len(codes):
        raise ValueError(f"sft_texts: {len(samples)} samples but {len(codes)} code sets")
    gen = _generator(model, seed, generator)
    docs = retrieved if retrieved is not None else [()] * len(samples)
    prompts = [sft_prompt(s, vocab, encode, _checked_codes(s, c), d) for s, c, d in zip(samples, codes, docs)]
    out: list[list[int]] = []
    for s, e in _chunks(len(prompts), batch_size):
        out += tasks.infill_text(
            model, vocab, prompts[s:e], max_len=max_len, temperature=temperature, top_p=top_p, generator=gen
        )
    return out


def sft_retrieved(pipe, samples: Sequence[SftSample]) -> list[list[Document]] | None:
    """Per sample, the documents the pipeline's retriever gives its prompt text (`retrieval_query`;
    none for a prompt without text), or None when the pipeline retrieves nothing."""
    if pipe.retriever is None or pipe.retrieval_k <= 0:
        return None
    queries = [retrieval_query(s) for s in samples]
    asked = [i for i, q in enumerate(queries) if q]
    out: list[list[Document]] = [[] for _ in samples]
    for i, docs in zip(asked, pipe.retrieve([queries[i] for i in asked]) if asked else []):
        out[i] = list(docs)
    return out


def sft_generate(
    pipe,
    samples: Sequence[SftSample],
    images: Sequence[Mapping[str, object]],
    *,
    decoding: DecodingConfig | None = None,
    max_len: int = 32,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
) -> torch.Tensor | list[str]:
    """Run SFT samples of one kind on a `Pipeline` (`load_pipeline`).

    images: per sample {slot: PIL image or uint8 [H, W, 3]} of its input slots (`input_slots`).
    Image targets -> images float [N, 3, H, W] in [-1, 1] (decoding: the image recipe; edit uses
    its image_weight / text_weight); text targets -> N answers (decoded, `clean_answer`), by
    infilling with temperature / top_p (0: greedy) and at most max_len tokens."""
    kinds = {s.target in IMAGE_SLOTS for s in samples}
    if len(kinds) > 1:
        raise ValueError("sft_generate: pass image-target and text-target samples in separate calls")
    codes = encode_slots(pipe.image_tokenizer, images)
    encode = pipe.text_tokenizer.encode
    retrieved = sft_retrieved(pipe, samples)
    if kinds == {True}:
        out = sft_images(
            pipe.model,
            pipe.vocab,
            encode,
            samples,
            codes,
            pipe.tokens_per_image,
            decoding=decoding,
            seed=seed,
            batch_size=batch_size,
            retrieved=retrieved,
        )
        return pipe.image_tokenizer.decode(out)
    ids = sft_texts(
        pipe.model,
        pipe.vocab,
        encode,
        samples,
        codes,
        max_len=max_len,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        retrieved=retrieved,
    )
    return [clean_answer(pipe.text_tokenizer.decode(t)) for t in ids]
