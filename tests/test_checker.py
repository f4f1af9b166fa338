"""The pixel checker: right on true pairs, wrong on shuffled ones, robust to blur, noise and JPEG."""

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cm3leon.data.checker import caption_accuracy, check, compare, detect
from cm3leon.data.world import Scene, Shape, caption, parse_caption, render, scene_for

N_VAL = 1000


def blur(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    return np.clip(ndimage.gaussian_filter(x.astype(np.float32), (sigma, sigma, 0)).round(), 0, 255).astype(np.uint8)


def noise(x: np.ndarray, std: float = 10.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0, std, x.shape), 0, 255).round().astype(np.uint8)


def jpeg(x: np.ndarray, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


CORRUPTIONS = {
    "blur": blur,
    "noise": noise,
    "jpeg": jpeg,
    "blur+noise+jpeg": lambda x: jpeg(noise(blur(x))),
}


@pytest.fixture(scope="module")
def val_pairs():
    scenes = [scene_for(0, "val", i) for i in range(N_VAL)]
    return [render(s) for s in scenes], [caption(s) for s in scenes]


def true_and_shuffled_accuracy(images, captions) -> tuple[float, float]:
    """Accuracy on the true captions and on captions shuffled among the images (one detect each)."""
    perm = np.random.default_rng(1).permutation(len(captions))
    detected = [detect(img) for img in images]
    true = np.mean([compare(d, parse_caption(c)).correct for d, c in zip(detected, captions)])
    shuffled = np.mean([compare(d, parse_caption(captions[j])).correct for d, j in zip(detected, perm)])
    return float(true), float(shuffled)


def test_clean_images_all_correct_shuffled_captions_rejected(val_pairs):
    images, captions = val_pairs
    true, shuffled = true_and_shuffled_accuracy(images[:200], captions[:200])
    assert true == 1.0 and shuffled <= 0.05


def test_robust_to_blur_noise_and_jpeg_together(val_pairs):
    """All three corruptions at once on 300 pairs (the 1,000-pair bar runs in the slow suite)."""
    images, captions = val_pairs
    corrupted = [CORRUPTIONS["blur+noise+jpeg"](x) for x in images[:300]]
    true, shuffled = true_and_shuffled_accuracy(corrupted, captions[:300])
    assert true >= 0.98 and shuffled <= 0.05, (true, shuffled)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_robust_to_each_corruption_1000_pairs(val_pairs, name):
    """The acceptance bar: >= 0.98 on 1,000 true validation pairs, <= 0.05 on shuffled captions."""
    images, captions = val_pairs
    true, shuffled = true_and_shuffled_accuracy([CORRUPTIONS[name](x) for x in images], captions)
    assert true >= 0.98 and shuffled <= 0.05, (name, true, shuffled)


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The image moved by (dy, dx) pixels, uncovered pixels filled with the background."""
    out = np.empty_like(x)
    out[:] = x[0, 0]
    h, w = x.shape[:2]
    src = x[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = src
    return out


@pytest.mark.parametrize("d", [(3, 3), (-3, 2), (2, -3)])
def test_shapes_drawn_off_centre_are_read_by_their_own_cell(val_pairs, d):
    """A decoder or a generator may draw a shape a few pixels off; it still belongs to its cell."""
    images, captions = val_pairs
    assert caption_accuracy([shifted(x, *d) for x in images[:100]], captions[:100])["correct"] == 1.0


def test_same_coloured_large_shapes_in_neighbouring_cells_stay_apart():
    for kind in ("square", "circle"):
        for a, b in (("top left", "top"), ("center", "bottom"), ("left", "center")):
            s = Scene("white", (Shape(kind, "green", "large", a), Shape(kind, "green", "large", b)))
            assert check(blur(render(s)), caption(s)).correct, s


@pytest.mark.parametrize("size", [128, 256])
def test_any_square_resolution(val_pairs, size):
    _, captions = val_pairs
    scenes = [parse_caption(c) for c in captions[:40]]
    assert caption_accuracy([render(s, size) for s in scenes], captions[:40])["correct"] == 1.0


SCENE = Scene("white", (Shape("circle", "red", "large", "top left"), Shape("triangle", "blue", "small", "center")))


def described(**changes) -> str:
    """SCENE's caption with the first shape's attributes changed."""
    first = Shape(**{**SCENE.shapes[0].__dict__, **changes})
    return caption(Scene(SCENE.background, (first, SCENE.shapes[1])))


@pytest.mark.parametrize(
    "attr,value", [("colour", "green"), ("kind", "square"), ("size", "small"), ("position", "bottom right")]
)
def test_one_wrong_attribute_is_named(attr, value):
    result = check(render(SCENE), described(**{attr: value}))
    assert not result.correct and result.background and result.no_extra
    first, second = result.shapes
    assert second.correct
    assert {a: getattr(first, a) for a in ("colour", "kind", "size", "position")} == {
        a: a != attr for a in ("colour", "kind", "size", "position")
    }


def test_background_extra_and_missing_shapes():
    image = render(SCENE)
    assert check(image, caption(SCENE)).correct
    wrong_bg = check(image, caption(Scene("gray", SCENE.shapes)))
    assert not wrong_bg.correct and not wrong_bg.background and wrong_bg.colour and wrong_bg.position
    only_first = check(image, caption(Scene("white", SCENE.shapes[:1])))  # the blue triangle is unexplained
    assert not only_first.correct and not only_first.no_extra and only_first.shapes[0].correct
    missing = check(render(Scene("white", SCENE.shapes[:1])), caption(SCENE))  # the triangle is not drawn
    assert not missing.correct and missing.no_extra and missing.shapes[0].correct
    assert missing.shapes[1] == type(missing.shapes[1])(False, False, False, False)
    assert detect(image) == SCENE


def test_caption_accuracy_summary_and_bad_input(val_pairs):
    images, captions = val_pairs
    acc = caption_accuracy(np.stack(images[:20]), captions[:20])
    assert acc["correct"] == acc["accuracy"] == 1.0 and acc["n"] == 20
    assert {"background", "colour", "kind", "size", "position", "no_extra"} <= set(acc)
    half = caption_accuracy(images[:20], captions[:10] + captions[10:20][::-1])
    assert half["correct"] <= 0.5 + 1e-9
    with pytest.raises(ValueError):
        caption_accuracy(images[:3], captions[:2])
    with pytest.raises(ValueError, match="square uint8"):
        check(images[0].astype(np.float32) / 255, captions[0])
    with pytest.raises(ValueError, match="square uint8"):
        check(images[0][:, :40], captions[0])
    with pytest.raises(ValueError, match="does not parse"):
        check(images[0], "a purple cow")
    assert check(Image.fromarray(images[0]), captions[0]).correct  # PIL images work too
