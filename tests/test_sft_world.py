"""SFT samples of the embedded world: deterministic, disjoint splits, targets exact on the pixels."""

from collections import Counter

import numpy as np
import pytest

from cm3leon.data.checker import check, detect
from cm3leon.data.sft_templates import IMAGE_SLOTS, build_sft_sequence, render_sft_text
from cm3leon.data.sft_world import (
    COLUMNS,
    EDIT_OPS,
    NUMBERS,
    QUESTION_TYPES,
    ROWS,
    SEG_COLOURS,
    SFT_TASKS,
    answer_question,
    copy_source_baseline,
    edge_map,
    sample_images,
    scene_split,
    seg_map,
    sft_sample,
    sft_samples,
    shape_pixels,
    vqa_majority,
    vqa_majority_baseline,
)
from cm3leon.data.world import BACKGROUNDS, COLOURS, KINDS, SIZES, caption, parse_caption, render
from cm3leon.tokenizers.text_tokenizer import TextTokenizer
from cm3leon.vocab import Vocab
from project import SHIPPED_DIR

N = 60  # samples per task and split in the checks below


@pytest.fixture(scope="module")
def samples():
    return {(t, s): list(sft_samples(t, s, N)) for t in SFT_TASKS for s in ("train", "val")}


def subject(sample):
    """The scene a sample is asked about (and split by)."""
    return sample.source if sample.task == "edit" else sample.scene


def test_deterministic_and_seeded(samples):
    for (task, split), got in samples.items():
        assert got[:5] == [sft_sample(0, task, split, i) for i in range(5)]
        assert list(sft_samples(task, split, 3, start=2)) == got[2:5]
        other = [sft_sample(1, task, split, i) for i in range(5)]
        assert other != got[:5]  # another seed, other samples


def test_splits_are_disjoint_in_content(samples):
    for task in SFT_TASKS:
        seen = {}
        for split in ("train", "val"):
            got = samples[task, split]
            assert all(s.split == split and scene_split(subject(s)) == split for s in got)
            seen[split] = {caption(subject(s)) for s in got}
        assert not seen["train"] & seen["val"]
    assert sum(scene_split(s.scene) == "val" for s in samples["caption", "train"]) == 0
    with pytest.raises(ValueError, match="split 'test'"):
        sft_sample(0, "edit", "test", 0)


def _changed(a, b):
    """The Shape fields that differ between two shapes."""
    return {f for f in ("kind", "colour", "size", "position") if getattr(a, f) != getattr(b, f)}


def test_edits_change_exactly_the_edited_attribute_on_the_pixels():
    by_op = Counter()
    for s in sft_samples("edit", "train", 90):
        src, tgt = detect(render(s.source)), detect(render(s.scene))  # what the pixels show
        assert src == s.source and tgt == s.scene
        by_op[s.op] += 1
        instruction = s.sft.fields["instruction"]
        gone, new = set(src.shapes) - set(tgt.shapes), set(tgt.shapes) - set(src.shapes)
        if s.op == "background":
            assert tgt.shapes == src.shapes and tgt.background != src.background
            assert tgt.background in instruction
            continue
        assert tgt.background == src.background
        if s.op == "add":
            assert not gone and len(new) == 1 and len(tgt.shapes) == 2
            (shape,) = new
            assert f"{shape.size} {shape.colour} {shape.kind}" in instruction
        elif s.op == "remove":
            assert not new and len(gone) == 1 and len(tgt.shapes) == 1
        else:
            (a,), (b,) = gone, new
            attribute = {"recolour": "colour", "move": "position", "resize": "size"}[s.op]
            assert _changed(a, b) == {attribute}
            if s.op == "recolour":
                assert instruction.split()[-1] == b.colour
    assert set(by_op) == set(EDIT_OPS)


def test_vqa_answers_are_right_for_the_rendered_scene():
    types = Counter()
    for s in sft_samples("vqa", "train", 150):
        seen = detect(render(s.scene))  # the checker's reading of the pixels
        assert answer_question(seen, s.question_type, s.ref) == s.answer
        assert " " not in s.answer and s.answer == s.sft.fields["a"]
        allowed = {
            "colour": set(COLOURS),
            "kind": set(KINDS),
            "size": set(SIZES),
            "row": set(ROWS),
            "column": set(COLUMNS),
            "count": set(NUMBERS),
            "background": set(BACKGROUNDS),
        }[s.question_type]
        assert s.answer in allowed
        # the shape asked about is described without the attribute asked
        asked = {"row": "position", "column": "position"}.get(s.question_type, s.question_type)
        assert asked not in dict(s.ref)
        types[s.question_type] += 1
    assert set(types) == set(QUESTION_TYPES)


def test_grounded_boxes_contain_the_shapes_pixels():
    for s in sft_samples("grounded", "train", 40):
        image = render(s.scene, 256)
        background = np.all(image == BACKGROUNDS[s.scene.background], axis=-1)
        covered = np.zeros_like(background)
        assert len(s.sft.objects) == len(s.scene.shapes)
        for (name, (x1, y1, x2, y2)), shape in zip(s.sft.objects, s.scene.shapes):
            assert name == f"{shape.colour} {shape.kind}"
            own = np.all(image == COLOURS[shape.colour], axis=-1)
            box = np.zeros_like(own)
            box[y1:y2, x1:x2] = True
            # the shape's pixels lie in its box, and the box is tight (its border rows/cols are painted)
            assert (shape_pixels(shape, 256) & ~box).sum() == 0 and own[box].sum() == shape_pixels(shape, 256).sum()
            assert own[y1, x1:x2].any() and own[y2 - 1, x1:x2].any()
            assert own[y1:y2, x1].any() and own[y1:y2, x2 - 1].any()
            covered |= box
        assert not (~background & ~covered).any()  # every painted pixel is inside some box


def test_captions_parse_to_the_scene():
    for task in ("caption", "control", "grounded"):
        for s in sft_samples(task, "val", 20):
            assert parse_caption(s.sft.fields["caption"]) == s.scene
    templates = {s.sft.template for s in sft_samples("caption", "train", 40)}
    assert templates == {"caption", "caption_describe"}


def test_control_maps_are_drawn_from_the_scene():
    for s in sft_samples("control", "train", 20):
        images = sample_images(s)
        assert set(images) == {"control image", "image"}
        control = images["control image"]
        for shape in s.scene.shapes:
            inside = shape_pixels(shape, 64)
            if s.sft.fields["kind"] == "seg":
                assert np.all(control[inside] == SEG_COLOURS[shape.kind])
            else:
                assert control[inside].any() and not control[inside].all()  # an outline, not a fill
        painted = control.any(-1)
        union = np.any([shape_pixels(sh, 64) for sh in s.scene.shapes], axis=0)
        assert not (painted & ~union).any()
    kinds = {s.sft.fields["kind"] for s in sft_samples("control", "train", 20)}
    assert kinds == {"canny", "seg"}
    assert edge_map(s.scene).dtype == seg_map(s.scene).dtype == np.uint8


def test_baselines():
    edits = list(sft_samples("edit", "val", 30))
    for s in edits:
        copied = copy_source_baseline(s)
        assert np.array_equal(copied, sample_images(s)["image1"])
        assert not check(copied, caption(s.scene)).correct  # an edit always changes something
        assert check(sample_images(s)["image2"], caption(s.scene)).correct
    majority = vqa_majority(sft_samples("vqa", "train", 300))
    assert set(majority) == set(QUESTION_TYPES)
    val = list(sft_samples("vqa", "val", 100))
    accuracy = np.mean([vqa_majority_baseline(s, majority) == s.answer for s in val])
    assert 0.0 < accuracy < 0.8


def test_world_samples_build_sequences():
    bpe = TextTokenizer.from_file(SHIPPED_DIR / "world_bpe.json")
    vocab = Vocab(text_size=bpe.vocab_size, n_image_codes=2048, n_sentinels=8)
    codes = {slot: np.arange(64) for slot in IMAGE_SLOTS}
    longest = 0
    for task in SFT_TASKS:
        for s in sft_samples(task, "train", 10):
            ids, mask = build_sft_sequence(s.sft, vocab, bpe.encode, codes, seq_len=512)
            assert mask.any() and "{image" in render_sft_text(s.sft)
            longest = max(longest, len(ids))
    assert longest < 512
