"""`eval_fid.py eval=embedded` with retrieval on (PAPER.md section 6: FID with 0, 1 and 2 retrieved
documents): documents are retrieved by the prompt text from a memory bank of the embedded world, the
sequences fed to the model hold exactly those documents before the caption (in the conditional and
in the unconditional stream), and fid.json records the retrieval settings."""

from __future__ import annotations

import numpy as np
import pytest

from cm3leon.data.sequences import text_to_image_prompt, unconditional_prompt
from eval_builders import compose_eval, embedded_overrides, make_tiny_lm
from project import SHIPPED_DIR


@pytest.fixture(scope="module")
def ra_run(tiny_bank, tiny_eval_run, tmp_path_factory) -> dict:
    """The tiny world's memory bank and a random checkpoint that records it as the bank it was
    trained with (as train.py does with retrieval=ra)."""
    root = tmp_path_factory.mktemp("eval_ra")
    bank = tiny_bank
    ckpt = make_tiny_lm(
        root / "ra.ckpt", SHIPPED_DIR / "world_vqgan.ckpt", max_seq_len=384, retrieval={"k": 2, "folder": str(bank)}
    )
    return {**tiny_eval_run, "ckpt": ckpt, "bank": bank}


@pytest.mark.parametrize("k", [0, 1, 2])
def test_eval_fid_feeds_the_retrieved_documents(ra_run, k, tmp_path, monkeypatch):
    import eval_fid
    from cm3leon.eval.prompts import world_prompts
    from cm3leon.generation import session as session_module
    from cm3leon.generation.pipeline import load_lm
    from cm3leon.retrieval.protocol import RetrievalQuery
    from cm3leon.retrieval.retriever import Retriever
    from cm3leon.tokenizers.text_tokenizer import TextTokenizer

    fed: list[list[int]] = []  # every prompt row the decode session is given
    real_init = session_module.DecodeSession.__init__

    def recording_init(self, model, prompts, *args, **kwargs):
        fed.extend([list(map(int, p)) for p in prompts])
        real_init(self, model, prompts, *args, **kwargs)

    monkeypatch.setattr(session_module.DecodeSession, "__init__", recording_init)
    overrides = [o for o in embedded_overrides(ra_run, tmp_path, n=2) if not o.startswith("eval.samples_per_caption")]
    cfg = compose_eval([*overrides, "eval.samples_per_caption=1", f"retrieval.k={k}"])
    result = eval_fid.run(cfg)

    assert result["retrieval"]["k"] == k
    if k:
        assert result["retrieval"]["dir"] == str(ra_run["bank"].resolve()) and result["retrieval"]["encoder"]
    # what the model must have seen: per caption, its k documents (retrieved by the caption text)
    # before it, in the conditional stream and in the unconditional one (CFG: caption dropped)
    _, vocab, _ = load_lm(ra_run["ckpt"])
    bpe = TextTokenizer.from_file(SHIPPED_DIR / "world_bpe.json")
    captions = [p.caption for p in world_prompts(2, 0, "val", 0)]
    docs = [[] for _ in captions]
    if k:
        docs = Retriever(ra_run["bank"], k=k).documents([RetrievalQuery(text=c) for c in captions], k)
        assert [len(d) for d in docs] == [k, k]
    for caption, d in zip(captions, docs):
        ids = np.asarray(bpe.encode(caption), np.int64)
        assert text_to_image_prompt(ids, vocab, d) in fed
        assert unconditional_prompt(vocab, d) in fed
    # every row: `T <break> I <break>` per document, then the prompt's own <break>
    assert {row.count(vocab.break_id) for row in fed} == {2 * k + 1}
