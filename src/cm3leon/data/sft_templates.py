"""Instruction-tuning (SFT) templates (PAPER.md section 7) and the token sequences built from them.

The templates, exactly as the paper writes them (`<break>` separates segments; `{image1}`,
`{image2}`, `{control image}`, `{image}` are image slots, the other `{...}` are text fields):

    edit              Edit first image following the instruction <break> {image1} <break> {instruction} <break> {image2}
    control           Make high quality image from {kind} features <break> {control image} <break> {caption} <break> {image}
    grounded          Generate high quality image of {caption} with segmentations {obj} at (x1, y1) -> (x2, y2), ... <break> {image}
    text              draw "{text}" <break> {image}
    caption           {caption} <break> {image}
    caption_describe  Describe the given picture. {caption} <break> {image}
    vqa               Question: {q} Answer: {a}. <break> {image}

The paper mentions "two variants" of the VQA template without writing them; this project's [I]:

    vqa_short         Q: {q} A: {a}. <break> {image}
    vqa_image_first   {image} <break> Question: {q} Answer: {a}.    (the image-to-text order)

Grounded objects are written `{obj} at ({x1}, {y1}) -> ({x2}, {y2})` joined by ", ", corners on
the 256 px grid (x right, y down; the box covers pixels x1 <= x < x2, y1 <= y < y2).

Token sequence (`build_sft_sequence`): every template is a chain of (text, image) pairs, so it is
laid out with the pretraining helpers of `cm3leon.data.sequences`: the pairs before the last are
framed like retrieved documents and the last like the query, i.e. the sequence is exactly what
`build_sequence(last, earlier, ...)` makes (tested): `</s> T1 <break> I1 <break> T2 <break> I2 </s>`.
Text segments are BPE-encoded; image slots are the codes given per slot, as vocabulary ids.

Target and loss mask: the *target* is the output of the task: the last image (edit, control,
grounded, text) or the answer/caption text span (caption, vqa). The paper trains SFT with the same
CM3 objective on the whole sequence (`loss_on: all`, the paper's choice); the returned `loss_mask`
marks the target tokens so that a config can instead put the loss on them only (`loss_on: target`).
`loss_mask[t]` marks token t as a target, i.e. the loss of predicting ids[t] from ids[:t]: with
shifted targets `ids[1:]`, use `loss_mask[1:]`. After a CM3 transform, carry the mask along with
`cm3_target_mask`. A text target starts with its leading space (" red", " a large ...") so that
its piece starts a BPE word: encoding the pieces apart gives the same ids as the whole text
(tested with the shipped BPE), and decoding a generated answer needs only `clean_answer`.

Image-to-text inference uses infilling (PAPER.md section 7): the answer span is masked and
generated after `<sentinel:0>` until `<eoss>`. `build_sft_sequence(..., infill=True)` gives a text
target in exactly that form (`</s> Question: q Answer: <sentinel:0> . <break> I </s> <sentinel:0> red <eoss>`,
mask on ` red <eoss>`); it must not be CM3-transformed again. Inference prompts come from here too
(`sft_prompt`, `generation_inputs`, `infill_inputs`) and are the training sequence cut where the
target starts, built with the same `sequences.py` functions `cm3leon.generation.tasks` calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from string import Formatter

import numpy as np

from cm3leon.data.sequences import (
    Document,
    caption_prompt,
    document_ids,
    retrieved_prefix,
    text_to_image_prompt,
)
from cm3leon.objective import Cm3Example, cm3_apply_spans
from cm3leon.vocab import EOS_ID, Vocab

Encode = Callable[[str], Sequence[int]]  # text -> BPE ids (e.g. TextTokenizer.encode)

BREAK = " <break> "  # how the templates write a segment boundary
TEMPLATES: dict[str, str] = {
    # the paper's (PAPER.md section 7), verbatim
    "edit": "Edit first image following the instruction <break> {image1} <break> {instruction} <break> {image2}",
    "control": "Make high quality image from {kind} features <break> {control image} <break> {caption} <break> {image}",
    "grounded": "Generate high quality image of {caption} with segmentations {obj} at (x1, y1) -> (x2, y2), ... <break> {image}",
    "text": 'draw "{text}" <break> {image}',
    "caption": "{caption} <break> {image}",
    "caption_describe": "Describe the given picture. {caption} <break> {image}",
    "vqa": "Question: {q} Answer: {a}. <break> {image}",
    # this project's VQA variants [I] (the paper says "and two variants")
    "vqa_short": "Q: {q} A: {a}. <break> {image}",
    "vqa_image_first": "{image} <break> Question: {q} Answer: {a}.",
}
PAPER_TEMPLATES = ("edit", "control", "grounded", "text", "caption", "caption_describe", "vqa")
TASK_OF = {
    "edit": "edit",
    "control": "control",
    "grounded": "grounded",
    "text": "text",
    "caption": "caption",
    "caption_describe": "caption",
    "vqa": "vqa",
    "vqa_short": "vqa",
    "vqa_image_first": "vqa",
}
# What the model must produce: an image slot or a text field.
TARGET_OF = {
    "edit": "image2",
    "control": "image",
    "grounded": "image",
    "text": "image",
    "caption": "caption",
    "caption_describe": "caption",
    "vqa": "a",
    "vqa_short": "a",
    "vqa_image_first": "a",
}
IMAGE_SLOTS = ("image1", "image2", "control image", "image")
CONTROL_KINDS = ("canny", "seg", "hed", "openpose", "depth", "normal", "scribble")  # the paper's list
EDIT_PREFIX = "Edit first image following the instruction"
# The grounded template's object list: the paper's schematic and how one object is written.
GROUNDED_SCHEMA = "{obj} at (x1, y1) -> (x2, y2), ..."
OBJECT_FORMAT = "{obj} at ({x1}, {y1}) -> ({x2}, {y2})"
GROUNDING_GRID = 256

_SLOT_TEXT = {"{" + s + "}": s for s in IMAGE_SLOTS}  # "{control image}" -> "control image"
Box = tuple[int, int, int, int]  # (x1, y1, x2, y2) on the 256 grid


@dataclass(frozen=True)
class SftSample:
    """One instruction sample, independent of how its images are tokenized.

    template: a key of TEMPLATES (it fixes the task: TASK_OF[template]).
    fields:   the template's text fields, e.g. {"instruction": ...}, {"kind": ..., "caption": ...},
              {"q": ..., "a": ...}.
    objects:  grounded only: ((name, (x1, y1, x2, y2)), ...) on the 256 grid.
    key:      names the sample in error messages.
    """

    template: str
    fields: Mapping[str, str]
    objects: tuple[tuple[str, Box], ...] = ()
    key: str = ""

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"SFT sample {self.name}: unknown template {self.template!r}; one of {list(TEMPLATES)}")
        object.__setattr__(self, "objects", tuple((str(n), tuple(b)) for n, b in self.objects))

    @property
    def task(self) -> str:
        return TASK_OF[self.template]

    @property
    def target(self) -> str:
        """The image slot or text field the model must produce."""
        return TARGET_OF[self.template]

    @property
    def name(self) -> str:
        return self.key or f"<{self.template}>"


# ---- template text ---------------------------------------------------------------------------
def format_objects(objects: Sequence[tuple[str, Sequence]]) -> str:
    """`red circle at (3, 3) -> (83, 83), blue square at ...`: the grounded object list."""
    return ", ".join(OBJECT_FORMAT.format(obj=n, x1=b[0], y1=b[1], x2=b[2], y2=b[3]) for n, b in objects)


def _segment_formats(template: str) -> list[str]:
    """The template's segments as format strings (the grounded schematic becomes `{objects}`)."""
    return TEMPLATES[template].replace(GROUNDED_SCHEMA, "{objects}").split(BREAK)


def _values(sample: SftSample) -> dict[str, str]:
    values = dict(sample.fields)
    if sample.task == "grounded":
        if not sample.objects:
            raise ValueError(f"SFT sample {sample.name}: the grounded template needs at least one object")
        values["objects"] = format_objects(sample.objects)
    return values


def _text_pieces(fmt: str, values: Mapping[str, str], target: str, name: str) -> list[tuple[str, bool]]:
    """A text segment as [(text, is_target), ...]: the target field in its own piece, with the
    space before it (a BPE word starts with its space, so the pieces encode like the whole)."""
    pieces: list[tuple[str, bool]] = []

    def add(text: str, is_target: bool) -> None:
        if text and pieces and not is_target and not pieces[-1][1]:
            pieces[-1] = (pieces[-1][0] + text, False)  # plain text stays one piece: split only around the target
        elif text:
            pieces.append((text, is_target))

    for literal, fname, _, _ in Formatter().parse(fmt):
        if fname is None:
            add(literal, False)
            continue
        if fname not in values:
            raise ValueError(f"SFT sample {name}: template field {{{fname}}} is missing from its fields")
        value = str(values[fname])
        if fname != target:
            add(literal + value, False)
        elif literal.endswith(" "):
            add(literal[:-1], False)
            add(" " + value, True)
        else:
            add(literal, False)
            add(value, True)
    return pieces


def render_sft_text(sample: SftSample) -> str:
    """The sample as template text, image slots left as placeholders, e.g.
    'Question: what colour is the circle? Answer: red. <break> {image}'."""
    values = _values(sample)
    out = []
    for fmt in _segment_formats(sample.template):
        if fmt in _SLOT_TEXT:
            out.append(fmt)
        else:
            out.append("".join(t for t, _ in _text_pieces(fmt, values, "", sample.name)))
    return BREAK.join(out)


# ---- token layout ----------------------------------------------------------------------------
@dataclass
class _Pair:
    """One (text, image) pair of a template, as a pretraining Document plus its target marks."""

    doc: Document
    image_first: bool
    slot: str
    text_mask: np.ndarray  # bool [len(text)]
    before: list[int] = field(default_factory=list)  # text target: ids before / after the target
    after: list[int] = field(default_factory=list)


def _pairs(sample: SftSample, encode: Encode, codes: Mapping[str, np.ndarray] | None) -> list[_Pair]:
    """The template's segments grouped into (text, image) pairs, text encoded, codes attached."""
    values, target = _values(sample), sample.target
    segments = _segment_formats(sample.template)
    pairs = []
    for a, b in zip(segments[0::2], segments[1::2]):
        image_first = a in _SLOT_TEXT
        slot_fmt, text_fmt = (a, b) if image_first else (b, a)
        slot = _SLOT_TEXT[slot_fmt]
        ids, mask, before, after = [], [], [], []
        for text, is_target in _text_pieces(text_fmt, values, target, sample.name):
            piece = [int(i) for i in encode(text)]
            if not is_target:
                (after if any(mask) else before).extend(piece)  # around the target: for infill prompts
            ids += piece
            mask += [is_target] * len(piece)
        if codes is None:
            image = np.zeros(0, dtype=np.int64)  # text-only use (infill_inputs)
        elif slot not in codes:
            raise ValueError(f"SFT sample {sample.name}: no image codes for slot {slot!r} (got {list(codes)})")
        else:
            image = np.asarray(codes[slot], dtype=np.int64).reshape(-1)
        doc = Document(np.asarray(ids, dtype=np.int64), image)
        pairs.append(_Pair(doc, image_first, slot, np.asarray(mask, dtype=bool), before, after))
    return pairs


def _pair_mask(p: _Pair, target_slot: str) -> np.ndarray:
    """Target marks of document_ids(p.doc, image_first=p.image_first): text, <break>, image (or reversed)."""
    image = np.full(len(p.doc.codes), p.slot == target_slot)
    parts = (image, [False], p.text_mask) if p.image_first else (p.text_mask, [False], image)
    return np.concatenate(parts).astype(bool)


def build_sft_sequence(
    sample: SftSample,
    vocab: Vocab,
    encode: Encode,
    codes: Mapping[str, np.ndarray],
    seq_len: int | None = None,
    infill: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One SFT sample -> (ids int64 [T], loss_mask bool [T]) (see the module docstring).

    codes: image slot name ("image", "image1", "image2", "control image") -> raw codes [h*w].
    infill: a text target (caption, vqa) in the infilling form of inference; ValueError for an
        image target. Raises ValueError naming the sample when T > seq_len.
    """
    if sample.task == "control" and sample.fields.get("kind") not in CONTROL_KINDS:
        raise ValueError(
            f"SFT sample {sample.name}: control kind {sample.fields.get('kind')!r} is not one of {CONTROL_KINDS}"
        )
    pairs = _pairs(sample, encode, codes)
    if any(p.image_first for p in pairs[:-1]):
        raise ValueError(f"template {sample.template!r}: only its last (text, image) pair may put the image first")
    last = pairs[-1]
    docs = [p.doc for p in pairs[:-1]]
    # the pretraining layout: earlier pairs framed like retrieved documents, the last like the query
    ids = np.concatenate(
        [
            np.asarray(retrieved_prefix(docs, vocab), dtype=np.int64),
            document_ids(last.doc, vocab, image_first=last.image_first),
            np.array([EOS_ID], dtype=np.int64),
        ]
    )
    masks = [[False]]
    for p in pairs[:-1]:
        masks += [_pair_mask(p, sample.target), [False]]
    mask = np.concatenate([*masks, _pair_mask(last, sample.target), [False]]).astype(bool)
    assert len(mask) == len(ids), (len(mask), len(ids))
    if infill:
        if sample.target in IMAGE_SLOTS:
            raise ValueError(f"SFT sample {sample.name}: infill=True is for text targets, not {sample.target!r}")
        (where,) = np.nonzero(mask)
        ex = cm3_apply_spans(ids, [(int(where[0]), int(where[-1]) + 1)], vocab, truncate=False)
        ids, mask = ex.ids, cm3_target_mask(mask, ex)
    if seq_len is not None and len(ids) > seq_len:
        n_text = sum(len(p.doc.text_ids) for p in pairs)
        n_image = sum(len(p.doc.codes) for p in pairs)
        raise ValueError(
            f"SFT sample {sample.name} ({sample.template}) is {len(ids)} tokens ({n_text} text, {n_image} image), "
            f"longer than seq_len={seq_len}: shorten its text or raise data.seq_len"
        )
    vocab.check_ids(ids, what=f"SFT sample {sample.name}")
    return ids, mask


def cm3_target_mask(mask, ex: Cm3Example, n_content: int | None = None) -> np.ndarray:
    """Carry a target mask through a CM3 transform: bool [len(ex.ids)].

    mask: bool [L] over the transform's input (trailing pads, if any, after n_content: default L).
    A masked span's tokens keep their marks where they are appended; its `<eoss>` is a target when
    any of the span is (the stop signal of an infilled target); the `<sentinel:i>` tokens, in place
    and appended, are structure, never targets (at inference they are part of the prompt).
    """
    mask = np.asarray(mask, dtype=bool)
    n = len(mask) if n_content is None else n_content
    in_place, appended, prev = [], [], 0
    for s, e in ex.spans:
        in_place += [mask[prev:s], [False]]
        appended += [[False], mask[s:e], [bool(mask[s:e].any())]]
        prev = e
    out = np.concatenate([*in_place, mask[prev:n], *appended, mask[n:]]).astype(bool)
    return out[: len(ex.ids)]


def target_text(sample: SftSample) -> str:
    """The exact text a text target is trained on, with its leading space when it has one."""
    return "".join(t for t, is_target in _text_pieces_of_target(sample) if is_target)


def _text_pieces_of_target(sample: SftSample) -> list[tuple[str, bool]]:
    values = _values(sample)
    for fmt in _segment_formats(sample.template):
        if fmt not in _SLOT_TEXT and "{" + sample.target + "}" in fmt:
            return _text_pieces(fmt, values, sample.target, sample.name)
    raise ValueError(f"SFT sample {sample.name}: target {sample.target!r} is an image slot, not text")


# The text fields a prompt may retrieve with (never the target: a caption to be written is not a query).
QUERY_FIELDS = ("instruction", "caption", "q", "text")


def retrieval_query(sample: SftSample) -> str | None:
    """The text an SFT sample retrieves documents with (retrieval by the prompt's text, as at
    generation time, PAPER.md section 4): its query fields other than the target, joined; None when
    the prompt has no text (captioning: only the image)."""
    parts = [str(sample.fields[f]) for f in QUERY_FIELDS if f != sample.target and sample.fields.get(f)]
    return " ".join(parts) or None


def clean_answer(text: str) -> str:
    """A generated text target (span up to `<eoss>`, decoded) -> the answer as compared: stripped."""
    return text.strip()


# ---- inference prompts: the training sequence cut where the target starts -------------------
def generation_inputs(
    sample: SftSample, encode: Encode, codes: Mapping[str, np.ndarray]
) -> tuple[list[int], list[Document]]:
    """For an image target: (text ids of the last segment, the documents before it).

    `text_to_image_prompt(text, vocab, docs)` is then the prompt; in `cm3leon.generation.tasks`:
    generate_images(captions_ids=[text], retrieved=[docs]) for control/grounded/text (the CFG
    unconditional stream keeps the earlier documents, e.g. the control image), and for editing
    edit_images(prefix_ids=docs[0].text_ids, source_codes=docs[0].codes[None], instructions_ids=[text])."""
    if sample.target not in IMAGE_SLOTS:
        raise ValueError(f"SFT sample {sample.name}: {sample.template!r} has a text target; use infill_inputs")
    pairs = _pairs(sample, encode, codes)
    return pairs[-1].doc.text_ids.tolist(), [p.doc for p in pairs[:-1]]


def infill_inputs(sample: SftSample, encode: Encode) -> dict:
    """For a text target: the keyword arguments of `caption_prompt` / `caption_images`
    {text_before, text_after, image_first}; the model writes the target after `<sentinel:0>`."""
    if sample.target in IMAGE_SLOTS:
        raise ValueError(f"SFT sample {sample.name}: {sample.template!r} has an image target; use generation_inputs")
    pairs = _pairs(sample, encode, None)
    if len(pairs) != 1:
        raise ValueError(f"template {sample.template!r}: infilling prompts take one (text, image) pair")
    p = pairs[0]
    return {"text_before": p.before, "text_after": p.after, "image_first": p.image_first}


def sft_prompt(
    sample: SftSample,
    vocab: Vocab,
    encode: Encode,
    codes: Mapping[str, np.ndarray],
    retrieved: Sequence[Document] = (),
) -> list[int]:
    """The inference prompt: the training sequence up to where the model generates.

    Image target: `</s> ... <break>` before the target image (edit: `edit_prompts`' full stream).
    Text target: the infilling prompt `caption_prompt(...)`, ending with `<sentinel:0>`.
    retrieved: documents first, where SFT training with retrieval puts them (`insert_retrieved`)."""
    if sample.target in IMAGE_SLOTS:
        text, docs = generation_inputs(sample, encode, codes)
        return text_to_image_prompt(text, vocab, [*retrieved, *docs])
    kwargs = infill_inputs(sample, encode)  # checks: text target, one (text, image) pair
    p = _pairs(sample, encode, codes)[0]
    return caption_prompt(p.doc.codes, vocab, retrieved=list(retrieved), **kwargs)
