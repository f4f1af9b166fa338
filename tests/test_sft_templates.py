"""SFT templates: the paper's text, the token layout, the target mask, and the inference prompts."""

import numpy as np
import pytest

from cm3leon.data.sequences import Document, build_sequence, caption_prompt, edit_prompts, text_to_image_prompt
from cm3leon.data.sft_templates import (
    BREAK,
    EDIT_PREFIX,
    IMAGE_SLOTS,
    PAPER_TEMPLATES,
    TEMPLATES,
    SftSample,
    build_sft_sequence,
    clean_answer,
    cm3_target_mask,
    format_objects,
    generation_inputs,
    infill_inputs,
    render_sft_text,
    retrieval_query,
    sft_prompt,
    target_text,
)
from cm3leon.objective import cm3_apply_spans, cm3_inverse, cm3_transform
from cm3leon.tokenizers.text_tokenizer import TextTokenizer
from cm3leon.vocab import EOS_ID, Vocab
from project import SHIPPED_DIR

# PAPER.md section 7, copied verbatim.
PAPER = {
    "edit": "Edit first image following the instruction <break> {image1} <break> {instruction} <break> {image2}",
    "control": "Make high quality image from {kind} features <break> {control image} <break> {caption} <break> {image}",
    "grounded": "Generate high quality image of {caption} with segmentations {obj} at (x1, y1) -> (x2, y2), ... <break> {image}",
    "text": 'draw "{text}" <break> {image}',
    "caption": "{caption} <break> {image}",
    "caption_describe": "Describe the given picture. {caption} <break> {image}",
    "vqa": "Question: {q} Answer: {a}. <break> {image}",
}
FIELDS = {
    "edit": {"instruction": "make the red circle blue"},
    "control": {"kind": "canny", "caption": "a large red circle in the center on a white background"},
    "grounded": {"caption": "a small blue square on the left on a black background"},
    "text": {"text": "hello"},
    "caption": {"caption": "a large red circle in the center on a white background"},
    "caption_describe": {"caption": "a small blue square on the left on a black background"},
    "vqa": {"q": "What colour is the circle?", "a": "red"},
    "vqa_short": {"q": "How many shapes are there?", "a": "two"},
    "vqa_image_first": {"q": "What size is the red object?", "a": "small"},
}
OBJECTS = (("blue square", (3, 88, 82, 168)), ("red circle", (102, 102, 154, 154)))
N_CODES = 64  # the world VQGAN's 8x8 code grid


@pytest.fixture(scope="module")
def bpe():
    return TextTokenizer.from_file(SHIPPED_DIR / "world_bpe.json")


@pytest.fixture(scope="module")
def vocab(bpe):
    return Vocab(text_size=bpe.vocab_size, n_image_codes=2048, n_sentinels=8)


def sample(template, key=""):
    return SftSample(template, FIELDS[template], OBJECTS if template == "grounded" else (), key=key)


def fake_codes(seed=0):
    rng = np.random.default_rng(seed)
    return {slot: rng.integers(0, 2048, N_CODES) for slot in IMAGE_SLOTS}


def segments(ids, vocab):
    """ids without the framing `</s> ... </s>`, split on <break>."""
    assert ids[0] == EOS_ID and ids[-1] == EOS_ID
    out, cur = [], []
    for t in ids[1:-1].tolist():
        if t == vocab.break_id:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return [*out, cur]


# ---- the template text -----------------------------------------------------------------------
def test_templates_are_the_papers_verbatim():
    for name in PAPER_TEMPLATES:
        assert TEMPLATES[name] == PAPER[name]
    assert set(PAPER) == set(PAPER_TEMPLATES)


@pytest.mark.parametrize("name", [n for n in PAPER_TEMPLATES if n != "grounded"])
def test_render_with_placeholder_fields_gives_the_paper_line(name):
    fields = {f: "{" + f + "}" for f in FIELDS[name]}
    assert render_sft_text(SftSample(name, fields)) == PAPER[name]


def test_grounded_object_list_is_the_papers_schema():
    schematic = SftSample("grounded", {"caption": "{caption}"}, objects=[("{obj}", ("x1", "y1", "x2", "y2"))])
    # one object written like the paper's, which then goes on with ", ..." for more objects
    assert render_sft_text(schematic).replace(" <break>", ", ... <break>") == PAPER["grounded"]
    assert format_objects(OBJECTS) == "blue square at (3, 88) -> (82, 168), red circle at (102, 102) -> (154, 154)"


def test_render_real_samples():
    assert render_sft_text(sample("vqa")) == "Question: What colour is the circle? Answer: red. <break> {image}"
    assert (
        render_sft_text(sample("vqa_image_first"))
        == "{image} <break> Question: What size is the red object? Answer: small."
    )
    assert render_sft_text(sample("edit")) == (
        "Edit first image following the instruction <break> {image1} <break> make the red circle blue <break> {image2}"
    )
    assert render_sft_text(sample("grounded")) == (
        "Generate high quality image of a small blue square on the left on a black background with segmentations "
        "blue square at (3, 88) -> (82, 168), red circle at (102, 102) -> (154, 154) <break> {image}"
    )


# ---- the token sequence ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_sequence_decodes_back_to_the_template(name, bpe, vocab):
    s, codes = sample(name), fake_codes()
    ids, mask = build_sft_sequence(s, vocab, bpe.encode, codes)
    assert ids.dtype == np.int64 and mask.dtype == bool and ids.shape == mask.shape
    rendered = render_sft_text(s).split(BREAK)
    parts = segments(ids, vocab)
    assert len(parts) == len(rendered)
    for part, text in zip(parts, rendered):
        if text in {"{" + slot + "}" for slot in IMAGE_SLOTS}:  # an image slot: its codes as ids, nothing else
            assert part == vocab.codes_to_ids(codes[text[1:-1]]).tolist()
        else:
            assert all(vocab.is_text(np.array(part))) and bpe.decode(part) == text
            assert part == bpe.encode(text)  # the target piece encoded apart gives the whole text's ids


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_framing_is_the_pretraining_layout(name, bpe, vocab):
    """The (text, image) pairs laid out by build_sequence: earlier pairs as retrieved docs, the last as the query."""
    s, codes = sample(name), fake_codes(1)
    ids, _ = build_sft_sequence(s, vocab, bpe.encode, codes)
    texts = [p for p in render_sft_text(s).split(BREAK) if p not in {"{" + x + "}" for x in IMAGE_SLOTS}]
    slots = [p[1:-1] for p in render_sft_text(s).split(BREAK) if p in {"{" + x + "}" for x in IMAGE_SLOTS}]
    docs = [Document(np.array(bpe.encode(t)), codes[slot]) for t, slot in zip(texts, slots)]
    image_first = name == "vqa_image_first"
    expected, _ = build_sequence(docs[-1], docs[:-1], vocab, seq_len=10_000, image_first=image_first)
    assert ids.tolist() == expected.tolist()


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_loss_mask_covers_exactly_the_target(name, bpe, vocab):
    s, codes = sample(name), fake_codes(2)
    ids, mask = build_sft_sequence(s, vocab, bpe.encode, codes)
    (where,) = np.nonzero(mask)
    assert len(where) and np.all(np.diff(where) == 1)  # one contiguous run
    if s.target in IMAGE_SLOTS:
        assert ids[mask].tolist() == vocab.codes_to_ids(codes[s.target]).tolist()
    else:
        # the target starts with its space, except a caption that opens the text
        expected = s.fields[s.target] if name == "caption" else " " + s.fields[s.target]
        assert bpe.decode(ids[mask]) == target_text(s) == expected
        assert clean_answer(bpe.decode(ids[mask])) == s.fields[s.target]


@pytest.mark.parametrize("name", ["caption", "caption_describe", "vqa", "vqa_short", "vqa_image_first"])
def test_infill_form_is_the_inference_prompt_then_the_target(name, bpe, vocab):
    s, codes = sample(name), fake_codes(3)
    plain, _ = build_sft_sequence(s, vocab, bpe.encode, codes)
    ids, mask = build_sft_sequence(s, vocab, bpe.encode, codes, infill=True)
    prompt = sft_prompt(s, vocab, bpe.encode, codes)
    assert prompt[-1] == vocab.sentinel_id(0) and ids[: len(prompt)].tolist() == prompt
    # after the prompt: exactly the target and <eoss>, all of it (and nothing else) under the mask
    assert ids[-1] == vocab.eoss_id and mask[len(prompt) :].all() and not mask[: len(prompt)].any()
    assert clean_answer(bpe.decode(ids[len(prompt) : -1])) == s.fields[s.target]
    assert cm3_inverse(ids, vocab).tolist() == plain.tolist()
    # the same prompt through the keyword arguments that generation.tasks.caption_images takes
    assert caption_prompt(codes["image"], vocab, **infill_inputs(s, bpe.encode)) == prompt


@pytest.mark.parametrize("name", ["edit", "control", "grounded", "text"])
def test_image_prompt_is_the_sequence_up_to_the_target(name, bpe, vocab):
    s, codes = sample(name), fake_codes(4)
    ids, mask = build_sft_sequence(s, vocab, bpe.encode, codes)
    prompt = sft_prompt(s, vocab, bpe.encode, codes)
    assert prompt[-1] == vocab.break_id and len(prompt) == int(np.argmax(mask))
    assert ids[: len(prompt)].tolist() == prompt
    text, docs = generation_inputs(s, bpe.encode, codes)
    assert text_to_image_prompt(text, vocab, docs) == prompt
    with pytest.raises(ValueError, match="infill=True is for text targets"):
        build_sft_sequence(s, vocab, bpe.encode, codes, infill=True)


def test_edit_prompt_is_edit_prompts_full_stream(bpe, vocab):
    """generation.tasks.edit_images lays out its streams with edit_prompts: the same prefix."""
    s, codes = sample("edit"), fake_codes(5)
    text, docs = generation_inputs(s, bpe.encode, codes)
    full, img_cond, _ = edit_prompts(bpe.encode(EDIT_PREFIX), codes["image1"], text, vocab)
    assert docs[0].text_ids.tolist() == bpe.encode(EDIT_PREFIX)
    assert full == sft_prompt(s, vocab, bpe.encode, codes)
    assert img_cond[:-2] == full[: len(img_cond) - 2]  # the image-only stream drops the instruction


def test_over_length_names_the_sample_and_lengths(bpe, vocab):
    s, codes = sample("edit", key="edit/train/000000007"), fake_codes()
    ids, _ = build_sft_sequence(s, vocab, bpe.encode, codes, seq_len=10_000)
    build_sft_sequence(s, vocab, bpe.encode, codes, seq_len=len(ids))  # fits exactly
    with pytest.raises(ValueError, match=rf"edit/train/000000007 .* {len(ids)} tokens .*seq_len={len(ids) - 1}"):
        build_sft_sequence(s, vocab, bpe.encode, codes, seq_len=len(ids) - 1)
    v = sample("vqa", key="q7")
    n = len(build_sft_sequence(v, vocab, bpe.encode, codes, infill=True)[0])
    with pytest.raises(ValueError, match=rf"q7 .* {n} tokens"):  # the infill form counts its 3 extra tokens
        build_sft_sequence(v, vocab, bpe.encode, codes, seq_len=n - 1, infill=True)


def test_bad_samples_say_what_is_wrong(bpe, vocab):
    codes = fake_codes()
    with pytest.raises(ValueError, match="unknown template"):
        SftSample("poem", {})
    with pytest.raises(ValueError, match=r"\{instruction\} is missing"):
        build_sft_sequence(SftSample("edit", {}, key="k1"), vocab, bpe.encode, codes)
    with pytest.raises(ValueError, match="no image codes for slot 'control image'"):
        build_sft_sequence(sample("control"), vocab, bpe.encode, {"image": codes["image"]})
    with pytest.raises(ValueError, match="control kind 'sketch'"):
        build_sft_sequence(SftSample("control", {"kind": "sketch", "caption": "x"}), vocab, bpe.encode, codes)
    with pytest.raises(ValueError, match="at least one object"):
        build_sft_sequence(SftSample("grounded", {"caption": "x"}), vocab, bpe.encode, codes)
    with pytest.raises(ValueError, match="ids outside"):  # a code beyond the codebook
        build_sft_sequence(sample("caption"), vocab, bpe.encode, {"image": np.array([5000])})


# ---- the target mask through a CM3 transform -------------------------------------------------
def test_cm3_target_mask_follows_the_tokens(bpe, vocab):
    s, codes = sample("edit"), fake_codes(6)
    ids, mask = build_sft_sequence(s, vocab, bpe.encode, codes)
    # where each output token came from: the same spans applied to the positions themselves
    positions = np.arange(len(ids)) + 10  # all below the special ids, none equal to <pad>
    n_checked = 0
    for seed in range(30):
        ex = cm3_transform(ids, vocab, np.random.default_rng(seed), poisson_lambda=2.0, truncate=False)
        out = cm3_target_mask(mask, ex)
        assert out.shape == ex.ids.shape
        origin = cm3_apply_spans(positions, ex.spans, vocab, truncate=False).ids
        spans_left = list(ex.spans)
        for tok, o, m in zip(ex.ids, origin, out):
            if vocab.is_sentinel(tok):
                assert not m
            elif tok == vocab.eoss_id:
                a, b = spans_left.pop(0)
                assert m == mask[a:b].any()
            else:
                assert m == mask[o - 10]
                n_checked += 1
        # truncated back to the block length: the mask is cut the same way
        ex_cut = cm3_transform(ids, vocab, np.random.default_rng(seed), poisson_lambda=2.0)
        assert cm3_target_mask(mask, ex_cut).tolist() == out[: len(ex_cut.ids)].tolist()
    assert n_checked > 30 * (len(ids) - 20)


def test_retrieval_queries_are_the_prompt_text_never_the_target():
    """SFT retrieves by the prompt's text: a caption the model must write is not a query."""
    grounded = SftSample("grounded", {"caption": "a red circle"}, objects=[("red circle", (3, 3, 83, 83))])
    assert retrieval_query(grounded) == "a red circle"
    assert retrieval_query(SftSample("edit", {"instruction": "make it blue"})) == "make it blue"
    assert retrieval_query(SftSample("control", {"kind": "canny", "caption": "a red circle"})) == "a red circle"
    assert retrieval_query(SftSample("vqa_short", {"q": "what colour?", "a": "red"})) == "what colour?"
    assert retrieval_query(SftSample("text", {"text": "HELLO"})) == "HELLO"
    for template in ("caption", "caption_describe"):
        assert retrieval_query(SftSample(template, {"caption": "a red circle"})) is None
