import pytest
from tokenizers import Tokenizer, models

from cm3leon.data.world import caption, scene_for
from cm3leon.tokenizers.text_tokenizer import TextTokenizer, train_bpe
from cm3leon.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from world_fixtures import SHIPPED_BPE


@pytest.fixture(scope="module")
def shipped():
    return TextTokenizer.from_file(SHIPPED_BPE)


def test_shipped_bpe_special_ids_and_size(shipped):
    tok = shipped.tokenizer
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [BOS_ID, PAD_ID, EOS_ID, UNK_ID]
    assert 260 < shipped.vocab_size <= 1024  # byte alphabet + specials + the world's merges


def test_shipped_bpe_round_trips_world_captions_exactly(shipped):
    for i in range(300):
        text = caption(scene_for(0, "val", i))
        ids = shipped.encode(text)
        assert shipped.decode(ids) == text
        assert all(i >= 4 for i in ids), "caption text must never produce special ids"
    # whole captions compress to few tokens (merges learnt), not one token per byte
    assert len(shipped.encode(text)) < len(text) / 3


@pytest.mark.parametrize("text", ["", " lead space", "tabs\tand\nnewlines", "unicode üñí 漢字 🙂", "<s> literal"])
def test_byte_level_round_trip_any_text(shipped, text):
    assert shipped.decode(shipped.encode(text)) == text


def test_train_bpe_small_corpus():
    texts = ["the red circle", "the blue square", "a red square"] * 50
    tok = train_bpe(texts, vocab_size=300, min_frequency=2)
    assert tok.tokenizer.token_to_id("</s>") == EOS_ID
    assert tok.decode(tok.encode("the red square")) == "the red square"
    assert len(tok.encode("the red square")) < len("the red square")


def test_rejects_tokenizer_with_wrong_special_ids(tmp_path):
    bad = Tokenizer(models.BPE())
    bad.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    with pytest.raises(ValueError, match="<s>"):
        TextTokenizer(bad)


def test_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_bpe\.py"):
        TextTokenizer.from_file(tmp_path / "nope.json")
