"""SFT data: token shards round-trip, the mixture's caps and plan, loss_on masks, bad BYOD rows counted,
exact resume of the SFT stream."""

import functools
import json
import re
import shutil
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from cm3leon.data.packing import stack_rows
from cm3leon.data.preprocess import PreprocessConfig
from cm3leon.data.sequences import IGNORE_INDEX
from cm3leon.data.sft_datamodule import SftDataModule, infill_form
from cm3leon.data.sft_files import box_to_grid
from cm3leon.data.sft_mixture import MixturePlan, resolve_mixture
from cm3leon.data.sft_shards import SftShardMaker, SftSource, decode_record, summary_line
from cm3leon.data.sft_stream import MaskedRowPacker, SftShardStream
from cm3leon.data.sft_templates import TEMPLATES, build_sft_sequence
from cm3leon.data.sft_world import SFT_TASKS, sample_images, sft_sample
from cm3leon.data.token_stream import read_token_shard
from cm3leon.errors import UsageError
from cm3leon.tokenizers.image_tokenizer import ImageTokenizer
from cm3leon.tokenizers.text_tokenizer import TextTokenizer
from cm3leon.vocab import PAD_ID, Vocab
from sft_fixtures import MIXTURE, SEQ_LEN, SHIPPED_BPE, SHIPPED_VQ, make_sft_world_tokens, one_thread, world_sources

OBJECTIVE = {"transform": {"poisson_lambda": 1.0, "rotation_rate": 0.2}}


@pytest.fixture(scope="module")
def sft_tokens(tmp_path_factory):
    return make_sft_world_tokens(tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="module")
def tokenizers():
    return ImageTokenizer.from_checkpoint(SHIPPED_VQ), TextTokenizer.from_file(SHIPPED_BPE)


def datamodule(tokens, **kwargs) -> SftDataModule:
    args = dict(
        tokens_dir=str(tokens),
        sources=world_sources(16, 8),
        mixture=MIXTURE,
        seq_len=SEQ_LEN,
        micro_batch_size=4,
        num_workers=0,
        objective=OBJECTIVE,
        vocab={"n_sentinels": 16},
    )
    dm = SftDataModule(**{**args, **kwargs})
    dm.setup("fit")
    return dm


# ---- shards ----------------------------------------------------------------------------------
def _image_runs(ids: np.ndarray, vocab: Vocab) -> list[np.ndarray]:
    """The image codes of a sequence, one array per image, in sequence order."""
    is_image = vocab.is_image(ids)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_image.astype(int), [0]])))
    return [vocab.ids_to_codes(ids[a:b]) for a, b in zip(edges[0::2], edges[1::2])]


def test_shards_read_back_equal_build_sft_sequence(sft_tokens, tokenizers):
    """Every task's first shard, read back in a training vocabulary with other specials (base_size with a
    gap, 16 sentinels), is build_sft_sequence's output in that vocabulary: ids, mask, key and fields. The
    codes are the shipped VQGAN's of the sample's images (up to a few near-tie flips between batch sizes)."""
    image_tok, bpe = tokenizers
    vocab = Vocab(bpe.vocab_size, image_tok.n_codes, base_size=bpe.vocab_size + image_tok.n_codes + 40, n_sentinels=16)
    for task in SFT_TASKS:
        raws = read_token_shard(str(sft_tokens / "train" / task / "000000.tar"))
        assert len(raws) == 8
        for raw in raws:
            rec = decode_record(raw, vocab)
            index = int(rec.key.rsplit("-", 1)[1])
            sample = sft_sample(0, task, "train", index)
            slots = re.findall(r"\{(image1|image2|control image|image)\}", TEMPLATES[sample.sft.template])
            stored = dict(zip(slots, _image_runs(rec.ids, vocab)))
            ids, mask = build_sft_sequence(sample.sft, vocab, bpe.encode, stored)
            assert np.array_equal(rec.ids, ids) and np.array_equal(rec.loss_mask, mask), rec.key
            images = sample_images(sample)
            with one_thread():
                fresh = dict(zip(images, image_tok.encode(list(images.values())).numpy()))
            assert sorted(fresh) == sorted(stored)
            assert all(np.mean(fresh[k] == stored[k]) > 0.9 for k in fresh), rec.key  # these images' codes
            assert rec.meta["template"] == sample.sft.template and rec.meta["fields"] == dict(sample.sft.fields)
            assert rec.key == f"{task}-train-{index:09d}" and rec.meta["task"] == task
            if rec.text_target:  # the training-time infilling form is the builder's
                want = build_sft_sequence(sample.sft, vocab, bpe.encode, stored, infill=True)
                got = infill_form(rec.ids, rec.loss_mask, vocab)
                assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    report = json.loads((sft_tokens / "val" / "edit" / "report.json").read_text())
    assert report["written"] == 8 and report["longest"] <= SEQ_LEN and not any(report["skipped"].values())


# ---- mixture ---------------------------------------------------------------------------------
def test_mixture_weights_and_caps_by_hand():
    # equal weights over sizes 100 / 2,000 / 10,000: each asks 12,100 / 3 = 4,033.3 samples
    shares = resolve_mixture({"a": 100, "b": 2000, "c": 10000}, {"a": 1, "b": 1, "c": 1}, 3.0, 0.3)
    assert shares["a"].samples == 300 and shares["a"].capped == "max_repeat"  # 40.3x -> repeated 3x at most
    assert shares["b"].samples == 4033 and shares["b"].capped is None  # 2.017x
    assert shares["c"].samples == 4033 and shares["c"].capped is None  # 0.403x
    # sizes 1,000 each, weights 1 / 1 / 0.1 (sum 2.1): c asks 0.143x -> kept at 0.3x; a, b 1.4286x
    shares = resolve_mixture(
        {"a": 1000, "b": 1000, "c": 1000, "off": 50}, {"a": 1, "b": 1, "c": 0.1, "off": 0}, 3.0, 0.3
    )
    assert [shares[n].samples for n in "abc"] == [1429, 1429, 300] and shares["c"].capped == "min_keep"
    assert "off" not in shares
    # equal weights, equal sizes: every sample once
    assert {s.samples for s in resolve_mixture({"a": 7, "b": 7}, {"a": 2, "b": 2}, 3.0, 0.3).values()} == {7}
    with pytest.raises(UsageError, match="no samples"):
        resolve_mixture({"a": 0, "b": 5}, {"a": 1, "b": 1}, 3.0, 0.3)


def test_mixture_plan_reads_the_resolved_counts_and_all_of_a_downsampled_source():
    # source 0: shards of 10 + 6 samples, 40 per epoch (2.5x); source 1: 20 + 20, 12 per epoch (0.3x)
    plan = MixturePlan(((0, (10, 6)), (2, (20, 20))), (40, 12), seed=3)
    seen_down: set = set()
    for epoch in range(6):
        entries = plan(epoch)
        assert len(entries) == plan.entries_per_epoch()
        per_source = [sum(len(e.indices) for e in entries if (e.shard < 2) == (s == 0)) for s in (0, 1)]
        assert per_source == [40, 12]
        reads = {}
        for e in entries:
            for i in e.indices.tolist():
                reads[(e.shard, i)] = reads.get((e.shard, i), 0) + 1
        # up-sampled: every sample read 2 or 3 times (2.5x); shards apportioned 10:6 of the 8 extra
        assert {reads[(s, i)] for s, n in ((0, 10), (1, 6)) for i in range(n)} <= {2, 3}
        assert sum(reads[(0, i)] for i in range(10)) == 25
        # down-sampled: 6 + 6 distinct samples, another draw each epoch
        down = {k for k in reads if k[0] >= 2}
        assert len(down) == 12 and max(reads[k] for k in down) == 1
        seen_down |= down
    assert len(seen_down) > 30  # most of the 40 samples within 6 epochs
    assert [e.indices.tolist() for e in plan(1)] == [e.indices.tolist() for e in plan(1)]  # a pure function


# ---- batches and masks -----------------------------------------------------------------------
@pytest.mark.parametrize("packing", ["none", "split"])
def test_loss_on_target_masks_exactly_the_target_tokens(sft_tokens, packing):
    dm = datamodule(sft_tokens, loss_on="target", packing=packing)
    rng = np.random.default_rng(0)
    raws = [raw for task in SFT_TASKS for raw in read_token_shard(str(sft_tokens / "train" / task / "000000.tar"))[:3]]
    examples = [dm.make_example(decode_record(raw, dm.vocab), rng) for raw in raws]
    if packing == "none":
        items = examples[:4]
        width = SEQ_LEN + 1
        ids = np.stack([np.pad(e["ids"], (0, width - len(e["ids"])), constant_values=PAD_ID) for e in items])
        masks = np.stack([np.pad(e["loss_mask"], (0, width - len(e["loss_mask"]))) for e in items])
    else:
        items = list(MaskedRowPacker(SEQ_LEN, PAD_ID, split=True).rows(examples))[:2]
        packed = stack_rows(items)
        ids, masks = packed.ids, np.stack([r.loss_mask for r in items]) & np.pad(packed.target_mask, ((0, 0), (1, 0)))
    batch = dm.collate(items)
    width = batch["targets"].shape[1]
    want = np.where(masks[:, 1 : width + 1], ids[:, 1 : width + 1], IGNORE_INDEX)
    assert torch.equal(batch["targets"], torch.from_numpy(want))  # the target tokens, nothing else
    assert batch["n_real"] == int(masks[:, 1 : width + 1].sum()) > 0
    full = datamodule(sft_tokens, loss_on="all", packing=packing).collate(items)  # the paper's: every non-pad target
    assert int((full["targets"] != IGNORE_INDEX).sum()) > batch["n_real"]


def test_examples_are_cm3_transformed_or_infilled(sft_tokens):
    dm = datamodule(sft_tokens, infill_rate=1.0)
    vocab = dm.vocab
    raws = read_token_shard(str(sft_tokens / "train" / "vqa" / "000000.tar"))
    for raw in raws:  # every VQA example in the infilling form: its answer after the appended <sentinel:0>
        rec = decode_record(raw, vocab)
        ex = dm.make_example(rec, np.random.default_rng(1))
        assert np.array_equal(ex["ids"], infill_form(rec.ids, rec.loss_mask, vocab)[0])
    edits = [decode_record(r, vocab) for r in read_token_shard(str(sft_tokens / "train" / "edit" / "000000.tar"))]
    masked = [dm.make_example(rec, np.random.default_rng(i)) for i, rec in enumerate(edits * 4)]
    assert any(vocab.is_sentinel(e["ids"]).any() for e in masked)  # CM3 spans on image-target examples
    plain = datamodule(sft_tokens, cm3=False, infill_rate=0.0).make_example(edits[0], np.random.default_rng(0))
    assert np.array_equal(plain["ids"], edits[0].ids)


# ---- retrieval ---------------------------------------------------------------------------------
def test_retrieval_puts_the_prompts_documents_first_as_inference_does(sft_tokens, tokenizers, tiny_bank):
    """With retrieval.k=2 every example holds the documents the bank's Retriever gives its prompt text
    (none for captioning, whose prompt is only an image), after the opening </s>; the inference
    prompt with the same documents is that training sequence cut where the target starts."""
    from cm3leon.data.sequences import insert_retrieved
    from cm3leon.data.sft_templates import retrieval_query, sft_prompt
    from cm3leon.retrieval.retriever import Retriever

    _, bpe = tokenizers
    seq_len = 512  # two retrieved documents beside an edit's two images
    dm = datamodule(sft_tokens, seq_len=seq_len, cm3=False, infill_rate=0.0, retrieval={"k": 2, "dir": str(tiny_bank)})
    infilled = datamodule(sft_tokens, seq_len=seq_len, infill_rate=1.0, retrieval={"k": 2, "dir": str(tiny_bank)})
    vocab, retriever = dm.vocab, Retriever(tiny_bank, k=2)
    assert dm.data_meta()["retrieval"] == {"k": 2, "folder": str(tiny_bank.resolve())}  # generation's default bank
    for task in SFT_TASKS:
        for raw in read_token_shard(str(sft_tokens / "train" / task / "000000.tar"))[:2]:
            rec = decode_record(raw, vocab)
            query = retrieval_query(rec.sample)
            docs = retriever.documents([query], 2)[0] if query else []
            ex = dm.make_example(rec, np.random.default_rng(0))
            ids, mask, kept = insert_retrieved(rec.ids, rec.loss_mask, docs, vocab, seq_len)
            assert np.array_equal(ex["ids"], ids) and np.array_equal(ex["loss_mask"], mask), rec.key
            assert ex["n_retrieved"] == kept == (0 if task == "caption" else 2), rec.key
            slots = re.findall(r"\{(image1|image2|control image|image)\}", TEMPLATES[rec.meta["template"]])
            prompt = sft_prompt(rec.sample, vocab, bpe.encode, dict(zip(slots, _image_runs(rec.ids, vocab))), docs)
            if rec.text_target:  # asked by infilling: the training example in the infilling form
                ids = infilled.make_example(rec, np.random.default_rng(0))["ids"]
            assert prompt == ids[: len(prompt)].tolist(), rec.key


def test_retrieval_needs_a_bank_of_the_shards_tokenizers(sft_tokens, tiny_bank, tmp_path):
    with pytest.raises(UsageError, match="retrieval.dir=BANK") as e:
        datamodule(sft_tokens, retrieval={"k": 2, "dir": None})
    assert "\n" not in str(e.value)
    other = tmp_path / "retrieval"
    shutil.copytree(tiny_bank, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["train"]["token_meta"]["image_tokenizer"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="another image_tokenizer") as e:
        datamodule(sft_tokens, retrieval={"k": 2, "dir": str(other)})
    assert "\n" not in str(e.value)


# ---- bring your own data ---------------------------------------------------------------------
def _png(path, size=(64, 64), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)
    return path.name


def test_byod_rows_with_bad_images_or_missing_fields_are_skipped_and_counted(tmp_path, capsys):
    d = tmp_path / "files"
    d.mkdir()
    good, other = _png(d / "a.png"), _png(d / "b.png", colour=(20, 20, 200))
    (d / "broken.png").write_bytes(b"not an image")
    _png(d / "tiny.png", size=(8, 8))
    vqa = [
        {"image": good, "question": "What colour is the square?", "answer": "red"},
        {"image": other, "question": "How many shapes are there?", "answer": 2},  # a number: its text
        {"image": "missing.png", "question": "What colour?", "answer": "blue"},  # missing_image
        {"image": "broken.png", "question": "What colour?", "answer": "blue"},  # bad_image
        {"image": "tiny.png", "question": "What colour?", "answer": "blue"},  # small_image
        {"image": good, "question": "What colour is it?"},  # missing_field
        {"image": good, "question": "What?", "answer": "red", "template": "caption"},  # bad_field
        {"image": good, "question": "why " * 300, "answer": "red"},  # over_length
    ]
    lines = [json.dumps(r) for r in vqa] + ["{not json"]  # bad_row
    (d / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    (d / "edit.csv").write_text(
        f"source_image,instruction,target_image\n{good},make it blue,{other}\n{good},,{other}\n{good},x,gone.png\n"
    )
    wide = _png(d / "wide.png", size=(128, 64))
    objects = [{"name": "red square", "box": [64, 0, 96, 32]}, {"name": "cut", "box": [0, 0, 16, 16]}]
    (d / "grounded.jsonl").write_text(json.dumps({"caption": "a square", "objects": objects, "image": wide}) + "\n")
    sources = {
        "myvqa": SftSource("myvqa", "vqa", "file", train_file=str(d / "vqa.jsonl")),
        "myedit": SftSource("myedit", "edit", "file", train_file=str(d / "edit.csv")),
        "boxes": SftSource("boxes", "grounded", "file", train_file=str(d / "grounded.jsonl")),
    }
    cfg = PreprocessConfig(image_tokenizer=str(SHIPPED_VQ), text_tokenizer=str(SHIPPED_BPE), num_workers=1)
    maker = SftShardMaker(tmp_path / "tokens", cfg, SEQ_LEN, shard_size=4, progress=False)
    with one_thread():
        vqa_report, edit_report, box_report = maker.make([(s, "train") for s in sources.values()])
    assert box_report["written"] == 1
    assert vqa_report["written"] == 2
    skipped = {k: v for k, v in vqa_report["skipped"].items() if v}
    assert skipped == {
        "bad_row": 1, "missing_field": 1, "bad_field": 1, "missing_image": 1, "bad_image": 1, "small_image": 1,
        "over_length": 1,
    }  # fmt: skip
    assert vqa_report["skipped_where"]["missing_image"] == ["vqa.jsonl row 3"]
    line = summary_line(vqa_report)
    assert "myvqa" in line and "2 samples" in line and "missing_image 1" in line and "over_length 1" in line
    assert edit_report["written"] == 1 and edit_report["skipped"]["missing_field"] == 1
    assert edit_report["skipped"]["missing_image"] == 1
    vocab = Vocab(356, 2048, n_sentinels=16)
    recs = [decode_record(r, vocab) for r in read_token_shard(str(tmp_path / "tokens/train/myvqa/000000.tar"))]
    assert [r.meta["fields"]["a"] for r in recs] == ["red", "2"]
    (box,) = [decode_record(r, vocab) for r in read_token_shard(str(tmp_path / "tokens/train/boxes/000000.tar"))]
    # 128x64 -> short side 256: x4, 512 wide, crop 128 from the left; the object at x < 32 is cropped away
    assert box.meta["objects"] == [["red square", [128, 0, 256, 128]]]
    assert box_to_grid([0, 0, 16, 16], (128, 64), "pixels") is None
    # a rerun reuses every shard; changed inputs are refused without overwrite=true
    again = SftShardMaker(tmp_path / "tokens", cfg, SEQ_LEN, shard_size=4, progress=False)
    assert again.make([(sources["myvqa"], "train")])[0]["shards_made"] == 0
    (d / "vqa.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(UsageError, match="overwrite=true"):
        again.make([(sources["myvqa"], "train")])


def test_missing_sft_shards_stop_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="make_sft_shards") as e:
        SftDataModule(str(tmp_path / "none"), world_sources(4, 2), MIXTURE, embedded_world=False)
    assert "\n" not in str(e.value)


# ---- resume ----------------------------------------------------------------------------------
def _stream(dm, packer=None):
    decode = functools.partial(decode_record, vocab=dm.vocab)
    return SftShardStream(dm.train_shards, dm.train_plan, decode, dm.make_example, seed=5, batch_size=4, packer=packer)


def test_stream_resumes_exactly(sft_tokens):
    dm = datamodule(sft_tokens, sources={**world_sources(16, 8), "vqa": {**world_sources(16, 8)["vqa"], "weight": 3}})
    per_epoch = sum(s.samples for s in dm.shares.values())
    straight = _stream(dm)
    first = list(islice(straight, per_epoch + 12))  # into the second epoch
    assert len({e["key"] for e in first[:per_epoch]}) < per_epoch  # vqa repeated (up-sampled)
    assert len({e["key"].split("-")[0] for e in first[:8]}) > 1  # a batch mixes sources
    resumed = _stream(dm)
    resumed.start_batch = 7  # 28 samples consumed
    tail = list(islice(resumed, len(first) - 28))
    assert [e["key"] for e in tail] == [e["key"] for e in first[28:]]
    assert all(np.array_equal(a["ids"], b["ids"]) for a, b in zip(tail, first[28:]))  # the same CM3 masks
    # packed: restart from the stream position a row recorded
    packer = MaskedRowPacker(SEQ_LEN, PAD_ID, split=True)
    rows = list(islice(_stream(dm, packer), 12))
    again = _stream(dm, MaskedRowPacker(SEQ_LEN, PAD_ID, split=True))
    role, start, offset = rows[5].stream_pos
    again.start_positions = {role: (start, offset)}
    more = list(islice(again, 6))
    assert all(
        np.array_equal(a.ids, b.ids) and np.array_equal(a.loss_mask, b.loss_mask) for a, b in zip(more, rows[6:])
    )


def test_resume_with_another_mixture_is_refused(sft_tokens):
    dm = datamodule(sft_tokens)
    state = dm.state_dict()
    other = datamodule(
        sft_tokens, sources={**world_sources(16, 8), "edit": {**world_sources(16, 8)["edit"], "weight": 2}}
    )
    with pytest.raises(UsageError, match="mixture"):
        other.load_state_dict(state)
    dm.load_state_dict(state)  # the same mixture resumes
