"""Sequence packing: pack_examples, and packed rows giving each example exactly its unpacked loss
and gradients (document-aware attention, positions restarting per example)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cm3leon.data.packing import PAD_DOC, first_fit, pack_examples
from cm3leon.model import CM3LeonLM, ModelConfig, document_mask

PAD = 1
V = 97


def tiny_model(attn_impl: str = "sdpa", checkpointing: bool = False) -> CM3LeonLM:
    """A small random model with non-zero residual outputs, so that every layer does something."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layer=2,
        d_model=32,
        n_head=2,
        vocab_size=V,
        max_seq_len=64,
        zero_init_residual_out=False,
        init_std=0.1,
        pos_init_std=0.1,
        attn_impl=attn_impl,
        activation_checkpointing=checkpointing,
    )
    return CM3LeonLM(cfg).train()  # dropout 0: train mode only exercises checkpointing


def examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, V, n).astype(np.int64) for n in lengths]


# ---- pack_examples -----------------------------------------------------------------------------
def test_pack_examples_keeps_examples_whole_and_restarts_positions():
    exs = examples([10, 30, 7, 20, 33, 2, 5])
    seq_len = 32
    p = pack_examples(exs, seq_len, PAD)
    assert p.ids.shape[1] == seq_len + 1 and p.positions.shape == p.ids.shape == p.doc_ids.shape
    assert p.target_mask.shape == (p.ids.shape[0], seq_len)
    for i, (ex, (r, start)) in enumerate(zip(exs, p.placement)):
        n = len(ex)
        np.testing.assert_array_equal(p.ids[r, start : start + n], ex)  # whole, in one row
        np.testing.assert_array_equal(p.positions[r, start : start + n], np.arange(n))
        assert (p.doc_ids[r] == i).sum() == n
        # targets inside the example carry loss; the one after its last token does not
        assert p.target_mask[r, start : start + n - 1].all()
        if start + n - 1 < seq_len:
            assert not p.target_mask[r, start + n - 1]
    # padding: pad id, its own doc id, no loss
    pad = p.doc_ids == PAD_DOC
    assert (p.ids[pad] == PAD).all()
    assert not p.target_mask[pad[:, 1:]].any()
    # fewer rows than examples: first-fit fills rows
    assert p.ids.shape[0] < len(exs)


def test_first_fit_and_limits():
    assert first_fit([5, 5, 3, 2], capacity=8) == [(0, 0), (1, 0), (0, 5), (1, 5)]
    with pytest.raises(ValueError, match="does not fit"):
        pack_examples(examples([34]), 32, PAD)
    assert pack_examples(examples([33]), 32, PAD).target_mask.all()  # seq_len + 1 tokens fit, as unpacked
    assert pack_examples(examples([3]), 8, PAD, min_rows=4).ids.shape == (4, 9)


def test_document_mask_is_block_diagonal_causal():
    m = document_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


# ---- parity: packed == unpacked ------------------------------------------------------------------
def _unpacked(model, exs):
    """Per-example mean losses, each example alone (inputs ex[:-1], targets ex[1:])."""
    out = []
    for ex in exs:
        t = torch.from_numpy(ex)
        logits = model(t[None, :-1])[0]
        out.append(F.cross_entropy(logits, t[1:]))
    return torch.stack(out)


def _packed(model, exs, seq_len):
    p = pack_examples(exs, seq_len, PAD)
    ids, pos, docs = (torch.from_numpy(a) for a in p.inputs)
    targets = torch.from_numpy(p.targets)
    logits = model(ids, input_pos=pos, doc_ids=docs)
    R, T, _ = logits.shape
    losses = F.cross_entropy(logits.reshape(R * T, V), targets.reshape(R * T), reduction="none").view(R, T)
    mask = torch.from_numpy(p.target_mask)
    out = []
    for i in range(len(exs)):
        m = mask & (docs == i)
        assert m.sum() == len(exs[i]) - 1  # every target of the example, once
        out.append(losses[m].sum() / m.sum())
    return torch.stack(out)


@pytest.mark.parametrize(
    "impl,checkpointing", [("sdpa", False), ("math", False), ("sdpa", True)], ids=["sdpa", "math", "checkpointed"]
)
def test_packed_matches_unpacked_losses_and_gradients(impl, checkpointing):
    exs = examples([12, 40, 5, 17, 29, 3, 22, 9])
    seq_len = 48
    model = tiny_model(impl, checkpointing)

    ref = _unpacked(model, exs)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    got = _packed(model, exs, seq_len)
    got.sum().backward()

    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=0, msg=f"gradient of {n}")


def test_packing_matters():
    """Without doc_ids (plain causal attention over the row) the losses differ: the test has teeth."""
    exs = examples([12, 40, 5, 17])
    model = tiny_model()
    p = pack_examples(exs, 48, PAD)
    ids, pos, docs = (torch.from_numpy(a) for a in p.inputs)
    with torch.no_grad():
        a = model(ids, input_pos=pos, doc_ids=docs)
        b = model(ids, input_pos=pos)
    assert not torch.allclose(a, b, atol=1e-3)


def test_doc_ids_refused_with_cache():
    model = tiny_model().eval()
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="doc_ids"):
        model(torch.tensor([[3, 4]]), input_pos=torch.arange(2), cache=cache, doc_ids=torch.zeros(1, 2))


# ---- the DataModule's packed batches and the LightningModule ---------------------------------------
def _batches(tiny_tokens, lengths):
    from cm3leon.data.datamodule import CM3DataModule

    batches = {}
    for packing in (False, True):
        dm = CM3DataModule(str(tiny_tokens), seq_len=48, micro_batch_size=len(lengths), packing=packing)
        vocab = dm.load_meta()
        rng = np.random.default_rng(1)
        exs = [
            {"ids": rng.integers(4, vocab.text_size, n), "key": str(i), "n_retrieved": 0} for i, n in enumerate(lengths)
        ]
        batches[packing] = dm.collate(exs)
    return vocab, batches


def test_packed_collate_keeps_every_target_and_the_loss(tiny_tokens):
    from cm3leon.data.sequences import IGNORE_INDEX
    from cm3leon.lit.lm_module import CM3LeonLitModule

    lengths = [12, 40, 5, 17, 29, 3, 22, 9]
    vocab, b = _batches(tiny_tokens, lengths)
    plain, packed = b[False], b[True]
    R, T = packed["input_ids"].shape
    assert T == 48 and len(lengths) > R and packed["positions"].shape == packed["doc_ids"].shape == (R, T)
    assert packed["keys"] == plain["keys"]
    for i, n in enumerate(lengths):  # each example's targets, in order, and nothing else
        mine = packed["targets"][(packed["doc_ids"] == i) & (packed["targets"] != IGNORE_INDEX)]
        assert torch.equal(mine, plain["targets"][i, : n - 1])
    assert (packed["targets"] != IGNORE_INDEX).sum() == (plain["targets"] != IGNORE_INDEX).sum()

    torch.manual_seed(0)
    model = dict(n_layer=2, d_model=32, n_head=2, max_seq_len=64, zero_init_residual_out=False, init_std=0.1)
    lit = CM3LeonLitModule(model=model, vocab=vocab.to_dict())
    with torch.no_grad():
        losses = {k: lit._token_losses(v).sum() / (v["targets"] != IGNORE_INDEX).sum() for k, v in b.items()}
    torch.testing.assert_close(losses[True], losses[False], atol=1e-5, rtol=0)


def test_resume_is_exact_with_packing(tiny_tokens, tmp_path):
    """test_train's resume test with data.packing=true: the same batches, nothing repeated or skipped."""
    from test_train import read_keys, run_train, small_run_args

    common = [
        "data.packing=true",
        "data.num_workers=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "+callbacks.keys._target_=cm3leon.lit.callbacks.BatchKeysRecorder",
        "trainer.val_check_interval=100",
        "trainer.limit_val_batches=0",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_train(small_run_args(tiny_tokens, straight, "trainer.max_steps=4", *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_train(small_run_args(tiny_tokens, resumed, "trainer.max_steps=2", *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = f"ckpt_path={resumed}/checkpoints/last.ckpt"
    proc = run_train(small_run_args(tiny_tokens, resumed, "trainer.max_steps=4", ckpt, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["global_step"] == 4
    full, parts = read_keys(straight), read_keys(resumed)
    assert sorted(parts) == list(range(4)) and parts == full
