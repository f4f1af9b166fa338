"""The one id table of the project: text ids, image codes, and the CM3 special tokens.

Layout (PAPER.md section 1; the paper's instance is `Vocab.paper()`):

    [0, text_size)                      byte-level BPE text ids; <s>=0 <pad>=1 </s>=2 <unk>=3
    [text_size, image_offset)           reserved, never produced (the paper: 56,320..57,343)
    [image_offset, base_size)           image codes: id = image_offset + code
    base_size                           <break>   (marks every modality switch)
    base_size + 1                       <eoss>    (end of an infilled span)
    base_size + 2 + i                   <sentinel:i>, i in [0, n_sentinels)
    [.., size)                          padding rows so that `size` is a multiple of `pad_multiple`

The appended specials sit above 65,535 in the paper's table, so sequences are built in int32/int64;
text ids and image codes alone fit uint16 and are stored that way in the token shards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from cm3leon.utils import round_up

BOS_ID = 0  # <s>
PAD_ID = 1  # <pad>
EOS_ID = 2  # </s>
UNK_ID = 3  # <unk>
TEXT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")

# The paper's numbers (PAPER.md section 1), in one place.
PAPER_TEXT_SIZE = 56_320
PAPER_IMAGE_CODES = 8_192
PAPER_BASE_SIZE = 65_536
PAPER_SENTINELS = 514


@dataclass(frozen=True)
class Vocab:
    """The id table for one (text tokenizer, image tokenizer) pair.

    Args:
        text_size: size of the BPE vocabulary (its four special tokens included, at ids 0..3).
        n_image_codes: codebook size of the image tokenizer.
        base_size: first id after the image codes; defaults to `text_size + n_image_codes`.
        n_sentinels: number of `<sentinel:i>` tokens (the paper's code: 514).
        pad_multiple: embedding rows are padded to a multiple of this (8 in the paper's code).
    """

    text_size: int
    n_image_codes: int
    base_size: int | None = None
    n_sentinels: int = PAPER_SENTINELS
    pad_multiple: int = 8
    # derived fields, filled in __post_init__
    image_offset: int = field(init=False)
    break_id: int = field(init=False)
    eoss_id: int = field(init=False)
    first_sentinel_id: int = field(init=False)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        base = self.text_size + self.n_image_codes if self.base_size is None else self.base_size
        if self.text_size <= UNK_ID:
            raise ValueError(f"text_size={self.text_size} must hold the 4 special text tokens")
        if self.n_image_codes <= 0 or self.n_sentinels < 1:
            raise ValueError("n_image_codes and n_sentinels must be positive")
        if base - self.n_image_codes < self.text_size:
            raise ValueError(
                f"base_size={base} leaves no room for {self.text_size} text ids and "
                f"{self.n_image_codes} image codes; raise base_size or leave it unset"
            )
        object.__setattr__(self, "base_size", base)
        object.__setattr__(self, "image_offset", base - self.n_image_codes)
        object.__setattr__(self, "break_id", base)
        object.__setattr__(self, "eoss_id", base + 1)
        object.__setattr__(self, "first_sentinel_id", base + 2)
        object.__setattr__(self, "size", round_up(base + 2 + self.n_sentinels, self.pad_multiple))

    @classmethod
    def paper(cls) -> "Vocab":
        """The CM3Leon table: 56,320 text + 8,192 image codes in 65,536 base ids + specials."""
        return cls(PAPER_TEXT_SIZE, PAPER_IMAGE_CODES, PAPER_BASE_SIZE, PAPER_SENTINELS)

    # ---- ids -------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    def sentinel_id(self, i: int) -> int:
        """Id of `<sentinel:i>`."""
        if not 0 <= i < self.n_sentinels:
            raise IndexError(f"sentinel {i} out of range [0, {self.n_sentinels})")
        return self.first_sentinel_id + i

    @property
    def image_id_range(self) -> tuple[int, int]:
        """Half-open id range [lo, hi) of the image codes."""
        return self.image_offset, self.image_offset + self.n_image_codes

    # ---- conversions (work on numpy arrays and torch tensors alike) ------------------------
    def codes_to_ids(self, codes):
        """Image codes in [0, n_image_codes) -> vocabulary ids."""
        return codes + self.image_offset

    def ids_to_codes(self, ids):
        """Vocabulary ids of image tokens -> image codes."""
        return ids - self.image_offset

    def is_image(self, ids):
        lo, hi = self.image_id_range
        return (ids >= lo) & (ids < hi)

    def is_text(self, ids):
        return ids < self.text_size

    def is_sentinel(self, ids):
        return (ids >= self.first_sentinel_id) & (ids < self.first_sentinel_id + self.n_sentinels)

    def check_ids(self, ids: np.ndarray, what: str = "sequence") -> None:
        """Raise ValueError when `ids` holds an id outside the table or in the reserved gap."""
        ids = np.asarray(ids)
        bad = (ids < 0) | (ids >= self.first_sentinel_id + self.n_sentinels)
        bad |= (ids >= self.text_size) & (ids < self.image_offset)
        if bad.any():
            raise ValueError(f"{what} holds {int(bad.sum())} ids outside {self}: e.g. {ids[bad][:5]}")

    def token_name(self, i: int) -> str:
        """Readable name of a non-text id (for debugging and tests)."""
        if i == self.break_id:
            return "<break>"
        if i == self.eoss_id:
            return "<eoss>"
        if self.first_sentinel_id <= i < self.first_sentinel_id + self.n_sentinels:
            return f"<sentinel:{i - self.first_sentinel_id}>"
        if self.image_offset <= i < self.base_size:
            return f"<img:{i - self.image_offset}>"
        if i < self.text_size:
            return f"<text:{i}>"
        return f"<unused:{i}>"

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in ("text_size", "n_image_codes", "base_size", "n_sentinels", "pad_multiple")}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(
            **{k: d[k] for k in ("text_size", "n_image_codes", "base_size", "n_sentinels", "pad_multiple") if k in d}
        )
