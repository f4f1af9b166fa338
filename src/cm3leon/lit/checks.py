"""Configuration that can only fail (or go silently wrong) later, checked before a stage starts.

Each check is one line naming the option and the fix: a `UsageError` for what cannot work (more
DataLoader readers than shards, an endless stream without `trainer.max_steps`, the world's caption
checker on other captions), a `WorldModelWarning` for what works but measures the wrong thing (the
embedded world's tiny CLIP encoding or re-ranking real data).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping

from cm3leon.errors import UsageError
from cm3leon.retrieval.tiny_clip import TINY_CLIP as WORLD_CLIP


class WorldModelWarning(UserWarning):
    """The embedded world's tiny CLIP is about to be used on data that is not the world's."""


def check_max_steps(max_steps: int | None, option: str = "trainer.max_steps") -> None:
    """The training streams are endless (resampled): only max_steps ends a run (and sets the LR schedule)."""
    try:
        steps = int(max_steps)
    except (TypeError, ValueError):
        steps = 0
    if steps <= 0 or steps != max_steps:
        raise UsageError(
            f"{option}={max_steps}: the training stream is endless, so the run would never end (or do nothing); "
            f"set {option}=N with N > 0"
        )


def check_readers(n_shards: int, world_size: int, num_workers: int, where: str) -> None:
    """Each training reader (process x DataLoader worker) needs a shard of its own, or it starves."""
    per_process = max(int(num_workers), 1)  # num_workers=0 reads in the main process: one reader
    readers = world_size * per_process
    if n_shards >= readers:
        return
    fix = f"data.num_workers={n_shards // world_size}" if n_shards >= world_size else "fewer devices"
    raise UsageError(
        f"{n_shards} training shards in {where} < {readers} readers ({world_size} processes x "
        f"data.num_workers={num_workers}): some would get no data; use {fix}, or write more, smaller shards"
    )


def check_caption_checker(enabled: bool, val_shards, option: str = "module.val.caption_accuracy") -> None:
    """The world's pixel checker scores only world captions: refuse it on validation shards whose
    first captions do not parse (real data would crash at the first validation, or score nothing)."""
    if not enabled or not val_shards:
        return
    from cm3leon.data.checked_reader import iter_raw_captions
    from cm3leon.data.world import parse_caption

    captions = list(itertools.islice(iter_raw_captions(val_shards), 8))
    for caption in captions:
        try:
            parse_caption(caption)
            return
        except ValueError:
            continue
    seen = f"e.g. {captions[0]!r}" if captions else "no readable caption"
    raise UsageError(
        f"{option}=true scores reconstructions with the embedded world's caption checker, but the validation "
        f"shards {val_shards} hold other captions ({seen}): set {option}=false"
    )


def is_world_clip(clip: Mapping | None) -> bool:
    """True for an open_clip node ({model_name, pretrained}) naming the embedded world's tiny CLIP."""
    if not clip:
        return False
    return clip.get("model_name") == WORLD_CLIP or str(clip.get("pretrained") or "").endswith("world_clip.pt")


def warn_world_clip(option: str, clip: Mapping | None, why: str) -> bool:
    """Warn (one line) when `clip` is the world's tiny CLIP but the data is not the world's (`why`)."""
    if not is_world_clip(clip):
        return False
    warnings.warn(
        f"{option} is the embedded world's tiny CLIP ({WORLD_CLIP}), but {why}: its scores mean nothing there; "
        f"set {option}.model_name=ViT-B-32 {option}.pretrained=laion2b_s34b_b79k (the paper's) or your own model",
        WorldModelWarning,
        stacklevel=2,
    )
    return True


def warn_eval_world_clip(eval_cfg: Mapping) -> list[str]:
    """Warn for each CLIP of an evaluation (`conf/eval/*.yaml`: rerank, clip_score, feature_clip) that is
    the world's tiny CLIP while the prompts are not the world's (eval.kind != world). Returns the options."""
    if eval_cfg.get("kind") == "world":
        return []
    names = [f"eval.{n}" for n in ("rerank", "clip_score", "feature_clip")]
    why = f"eval.kind={eval_cfg.get('kind')} is not the embedded world"
    return [o for o in names if warn_world_clip(o, eval_cfg.get(o.split(".", 1)[1]), why)]
