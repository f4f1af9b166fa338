"""Byte-level BPE text tokenizer (Hugging Face `tokenizers`), trained by `src/train_bpe.py`.

The four special tokens come first so that their ids are the ones `cm3leon.vocab` fixes:
`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3. Byte-level BPE has no unknown characters, so
`decode(encode(text)) == text` for every string (tested). The paper's vocabulary is 56,320
(`cm3leon.vocab.PAPER_TEXT_SIZE`); the embedded world needs only a few hundred entries.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cm3leon.errors import UsageError
from cm3leon.utils import atomic_path
from cm3leon.vocab import TEXT_SPECIAL_TOKENS


class TextTokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with the project's id conventions."""

    def __init__(self, tokenizer: Tokenizer):
        for i, tok in enumerate(TEXT_SPECIAL_TOKENS):
            if tokenizer.token_to_id(tok) != i:
                raise ValueError(f"text tokenizer must map {tok} to id {i}; retrain it with src/train_bpe.py")
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer {path} not found; build it with `python src/train_bpe.py`")
        return cls(Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids (no BOS/EOS added: the sequence builder places those)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """BPE ids -> text; ids outside the text table must be removed by the caller."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the tokenizer JSON to `path` atomically; an existing file is replaced only with
        `overwrite` (else a one-line UsageError)."""
        check_new_output(path, overwrite)
        with atomic_path(path) as tmp:
            self.tokenizer.save(str(tmp))


def check_new_output(path: str | Path, overwrite: bool) -> None:
    """Raise a one-line UsageError when `path` exists and `overwrite` is not set: a writer calls
    this before its work (training), not only before writing."""
    if Path(path).exists() and not overwrite:
        raise UsageError(f"{path} exists: pass overwrite=true to replace it, or choose another output path")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE on an iterator of strings. The result may hold fewer than
    `vocab_size` entries when the corpus runs out of merges (the embedded world does)."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x exactly (no invented leading space)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(TEXT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)
