"""Sequence packing: pack_examples, and packed rows giving each example exactly its unpacked loss
and gradients (document-aware attention, positions restarting per example)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cm3leon.model
from cm3leon.data.packing import PAD_DOC, RowPacker, pack_examples, pad_fraction
from cm3leon.model import CM3LeonLM, ModelConfig, document_mask

PAD = 1
V = 97
# torch 2.14's FlexAttention runs forward-only on CPU (NotImplementedError when an input requires
# grad), so flex training forwards/gradients are tested on CUDA only
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FlexAttention has no CPU backward in torch 2.14: gradients need CUDA"
)


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
    placement = {ex: (r, start) for r, row in enumerate(p.rows) for ex, start, _, _ in row.pieces}
    assert p.ids.shape[1] == seq_len + 1 and p.positions.shape == p.ids.shape == p.doc_ids.shape
    assert p.target_mask.shape == (p.ids.shape[0], seq_len)
    for i, ex in enumerate(exs):
        r, start = placement[i]
        n = len(ex)
        np.testing.assert_array_equal(p.ids[r, start : start + n], ex)  # whole, in one row
        np.testing.assert_array_equal(p.positions[r, start : start + n], np.arange(n))
        assert (p.doc_ids[r] == p.doc_ids[r, start]).sum() == n
        # targets inside the example carry loss; the one after its last token does not
        assert p.target_mask[r, start : start + n - 1].all()
        if start + n - 1 < seq_len:
            assert not p.target_mask[r, start + n - 1]
    # padding: pad id, its own doc id, no loss
    pad = p.doc_ids == PAD_DOC
    assert (p.ids[pad] == PAD).all()
    assert not p.target_mask[pad[:, 1:]].any()
    # fewer rows than examples: next-fit in stream order, [10] [30] [7 20] [33] [2 5]
    assert [[pc[0] for pc in row.pieces] for row in p.rows] == [[0], [1], [2, 3], [4], [5, 6]]


def test_pack_examples_limits():
    with pytest.raises(ValueError, match="does not fit"):
        pack_examples(examples([34]), 32, PAD)
    assert pack_examples(examples([33]), 32, PAD).target_mask.all()  # seq_len + 1 tokens fit, as unpacked


def test_split_rows_are_full_and_train_every_target_once():
    lengths = [int(n) for n in np.random.default_rng(3).integers(2, 34, 40)]
    exs = examples(lengths, seed=4)
    seq_len = 32
    rows = list(RowPacker(seq_len, PAD, split=True).rows({"ids": e} for e in exs))
    # every row but the stream's last is full (a last free slot stays padding: a piece needs 2 tokens)
    assert all((r.doc_ids == PAD_DOC).sum() <= 1 for r in rows[:-1])
    targets = {i: [] for i in range(len(exs))}
    for r in rows:
        for ex, start, length, offset in r.pieces:
            np.testing.assert_array_equal(r.ids[start : start + length], exs[ex][offset : offset + length])
            np.testing.assert_array_equal(r.positions[start : start + length], np.arange(length))
            targets[ex] += list(exs[ex][offset + 1 : offset + length])
    for i, ex in enumerate(exs):  # the pieces' targets, in order, are the example's targets, once each
        assert targets[i] == list(ex[1:]), i
    p = pack_examples(exs, seq_len, PAD, split=True)
    assert p.target_mask.sum() == sum(n - 1 for n in lengths)
    assert pad_fraction(lengths, seq_len, split=True) < pad_fraction(lengths, seq_len, split=False)


@pytest.mark.parametrize("split", [False, True])
def test_row_packer_resumes_from_any_rows_stream_position(split):
    exs = examples([int(n) for n in np.random.default_rng(5).integers(2, 34, 30)], seed=6)
    packer = RowPacker(32, PAD, split=split)
    rows = list(packer.rows({"ids": e} for e in exs))
    for i in range(1, len(rows)):
        start, offset = rows[i - 1].stream_pos
        again = list(packer.rows(({"ids": e} for e in exs[start:]), start, offset))
        assert len(again) == len(rows) - i
        for a, b in zip(again, rows[i:]):
            assert a.pieces == b.pieces and a.stream_pos == b.stream_pos
            np.testing.assert_array_equal(a.ids, b.ids)


def test_packed_resume_refuses_another_stream_layout(tiny_tokens):
    from cm3leon.data.datamodule import CM3DataModule
    from cm3leon.errors import UsageError

    dm = CM3DataModule(str(tiny_tokens), seq_len=48, micro_batch_size=2, packing="split", num_workers=2, seed=1)
    state = {"train_batches_consumed": 4, "seed": 1, "micro_batch_size": 2, "packing": "split", "num_workers": 2}
    dm.load_state_dict({**state, "stream_positions": {0: {0: [3, 5], 1: [2, 0]}}})
    assert dm._start_positions == {0: {0: (3, 5), 1: (2, 0)}} and dm._start_batch == 4
    for bad, match in [
        ({"packing": "whole"}, "packing=whole"),
        ({"num_workers": 4}, "num_workers=4"),
        ({"stream_positions": {0: {}, 1: {}}}, "2 ranks"),
    ]:
        with pytest.raises(UsageError, match=match):
            dm.load_state_dict({**state, "stream_positions": {0: {}}, **bad})
    with pytest.raises(UsageError, match="data.packing=True"):
        CM3DataModule(str(tiny_tokens), packing=True)


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
def _device(model):
    return next(model.parameters()).device


def _unpacked(model, exs):
    """Per-example mean losses, each example alone (inputs ex[:-1], targets ex[1:])."""
    out = []
    for ex in exs:
        t = torch.from_numpy(ex)
        logits = model(t[None, :-1].to(_device(model)))[0].cpu()
        out.append(F.cross_entropy(logits, t[1:]))
    return torch.stack(out)


def _packed(model, exs, seq_len):
    p = pack_examples(exs, seq_len, PAD)
    ids, pos, docs = (torch.from_numpy(a) for a in p.inputs)
    targets = torch.from_numpy(p.targets)
    dev = _device(model)
    logits = model(ids.to(dev), input_pos=pos.to(dev), doc_ids=docs.to(dev)).cpu()
    R, T, _ = logits.shape
    losses = F.cross_entropy(logits.reshape(R * T, V), targets.reshape(R * T), reduction="none").view(R, T)
    mask = torch.from_numpy(p.target_mask)
    example_of = torch.full(docs.shape, -1)  # doc ids name pieces within a row: map them to examples
    for r, row in enumerate(p.rows):
        for ex, start, length, _ in row.pieces:
            example_of[r, start : start + length] = ex
    out = []
    for i in range(len(exs)):
        m = mask & (example_of == i)
        assert m.sum() == len(exs[i]) - 1  # every target of the example, once
        out.append(losses[m].sum() / m.sum())
    return torch.stack(out)


@pytest.mark.parametrize(
    "impl,checkpointing",
    [
        ("sdpa", False),
        ("math", False),
        ("sdpa", True),
        pytest.param("flex", False, marks=needs_cuda),
        pytest.param("flex", True, marks=needs_cuda),
    ],
    ids=["sdpa", "math", "checkpointed", "flex", "flex-checkpointed"],
)
def test_packed_matches_unpacked_losses_and_gradients(impl, checkpointing):
    exs = examples([12, 40, 5, 17, 29, 3, 22, 9])
    seq_len = 48
    model = tiny_model(impl, checkpointing)
    if impl == "flex":
        model.cuda()

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
        dm = CM3DataModule(str(tiny_tokens), seq_len=48, micro_batch_size=len(lengths), packing=packing and "whole")
        vocab = dm.load_meta()
        rng = np.random.default_rng(1)
        exs = [
            {"ids": rng.integers(4, vocab.text_size, n), "key": str(i), "n_retrieved": 0} for i, n in enumerate(lengths)
        ]
        batches[packing] = dm.collate(list(RowPacker(48, PAD, split=False).rows(exs)) if packing else exs)
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
    firsts = (packed["positions"] == 0) & (packed["doc_ids"] >= 0)  # each example's first token, in order
    example_of = firsts.flatten().cumsum(0).view(R, T) - 1
    for i, n in enumerate(lengths):  # each example's targets, in order, and nothing else
        mine = packed["targets"][(example_of == i) & (packed["doc_ids"] >= 0) & (packed["targets"] != IGNORE_INDEX)]
        assert torch.equal(mine, plain["targets"][i, : n - 1])
    assert (packed["targets"] != IGNORE_INDEX).sum() == (plain["targets"] != IGNORE_INDEX).sum()

    torch.manual_seed(0)
    model = dict(n_layer=2, d_model=32, n_head=2, max_seq_len=64, zero_init_residual_out=False, init_std=0.1)
    lit = CM3LeonLitModule(model=model, vocab=vocab.to_dict())
    with torch.no_grad():
        losses = {k: lit._token_losses(v).sum() / (v["targets"] != IGNORE_INDEX).sum() for k, v in b.items()}
    torch.testing.assert_close(losses[True], losses[False], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", [pytest.param("whole", marks=pytest.mark.slow), "split"])  # split: the harder resume
def test_resume_is_exact_with_packing(tiny_tokens, tmp_path, mode):
    """test_train's resume test with packing: the same batches, nothing repeated or skipped (split:
    the resumed stream restarts inside a cut example)."""
    from test_train import read_keys, run_train, small_run_args

    common = [
        f"data.packing={mode}",
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

    def batches(run):  # (step, input ids hash) of every batch: the rows themselves, token for token
        return [
            (r["step"], r["ids_sha1"]) for r in map(json.loads, (run / "batch_keys.jsonl").read_text().splitlines())
        ]

    assert batches(resumed) == batches(straight) and len(batches(straight)) == 4


# ---- attn_impl="flex": FlexAttention with one BlockMask per forward --------------------------------
# eager flex_attention (CPU) warns that it is not the fused kernel: that is what the CPU tests want
flex_cpu = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _packed_rows(T=63):
    """Two hand-packed rows of length T (not a multiple of the 128 block): ids, positions, doc_ids [2, T].
    Row 0: examples of 20, 25, 10 tokens, then padding; row 1: 40 + 23 tokens, no padding."""
    docs = torch.full((2, T), PAD_DOC)
    pos = torch.zeros(2, T, dtype=torch.long)
    for r, lengths in enumerate([[20, 25, 10], [40, T - 40]]):
        start = 0
        for d, n in enumerate(lengths):
            docs[r, start : start + n] = 10 * r + d
            pos[r, start : start + n] = torch.arange(n)
            start += n
    ids = torch.randint(2, V, (2, T), generator=torch.Generator().manual_seed(0))
    return ids, pos, docs


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(cm3leon.model, name)
    monkeypatch.setattr(cm3leon.model, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@flex_cpu
def test_flex_forward_matches_sdpa(monkeypatch):
    ids, pos, docs = _packed_rows()
    flex, sdpa = tiny_model("flex"), tiny_model("sdpa")  # the same weights (seed 0)
    masks, attns = _count_calls(monkeypatch, "document_block_mask"), _count_calls(monkeypatch, "_flex_attention")
    with torch.no_grad():  # CPU FlexAttention is forward-only
        for d in (docs, None):  # packed rows, and plain causal rows
            torch.testing.assert_close(
                flex(ids, input_pos=pos, doc_ids=d), sdpa(ids, input_pos=pos, doc_ids=d), atol=1e-5, rtol=0
            )
    assert len(masks) == 2 and len(attns) == 2 * flex.config.n_layer  # one BlockMask per forward, flex per layer


@needs_cuda
def test_flex_logits_and_gradients_match_sdpa_on_cuda():
    ids, pos, docs = (t.cuda() for t in _packed_rows())
    targets = torch.roll(ids, -1, dims=1)
    out = {}
    for impl in ("flex", "sdpa"):
        model = tiny_model(impl).cuda()
        logits = model(ids, input_pos=pos, doc_ids=docs)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        out[impl] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(out["flex"][0], out["sdpa"][0], atol=1e-5, rtol=0)
    for n, g in out["sdpa"][1].items():
        torch.testing.assert_close(out["flex"][1][n], g, atol=1e-5, rtol=0, msg=f"gradient of {n}")


@flex_cpu
def test_flex_decodes_with_kv_cache_through_sdpa(monkeypatch):
    idx = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(1))
    flex, sdpa = tiny_model("flex").eval(), tiny_model("sdpa").eval()
    with torch.no_grad():
        full = flex(idx)  # no cache: FlexAttention
        monkeypatch.setattr(cm3leon.model, "_flex_attention", None)  # with a cache flex must not be called
        got = {}
        for name, model in (("flex", flex), ("sdpa", sdpa)):
            cache = model.new_cache(2, 16)
            steps = [model(idx[:, :8], input_pos=torch.arange(8), cache=cache)]
            steps += [model(idx[:, t : t + 1], input_pos=torch.tensor([t]), cache=cache) for t in range(8, 12)]
            got[name] = torch.cat(steps, dim=1)
    torch.testing.assert_close(got["flex"], got["sdpa"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["flex"], full, atol=1e-5, rtol=0)


def test_flex_refuses_attention_dropout():
    cfg = ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=V, max_seq_len=64, dropout=0.1, attn_impl="flex")
    model = CM3LeonLM(cfg).train()
    with pytest.raises(ValueError, match="attn_impl=flex has no attention dropout; set dropout=0 or attn_impl=sdpa"):
        model(torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.slow  # ~60 s: two 2-process runs
def test_packed_stream_positions_of_every_rank_are_saved_and_resumed_under_ddp(tiny_tokens, tmp_path):
    """DDP (gloo, 2 processes) with split packing: the checkpoint holds both ranks' stream positions
    (gathered: the file is rank 0's), a 2-rank resume continues, a 1-rank resume is refused."""
    import torch

    from test_train import run_train, small_run_args

    run = tmp_path / "run"
    ddp = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "+trainer.strategy.process_group_backend=gloo",
        "trainer.limit_val_batches=0",
        "data.num_workers=1",
        "data.packing=split",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    state = {}
    for steps in (3, 5):
        proc = run_train(small_run_args(tiny_tokens, run, *ddp, f"trainer.max_steps={steps}", "ckpt_path=last"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == steps
        state[steps] = ckpt["CM3DataModule"]["stream_positions"]
        assert sorted(state[steps]) == [0, 1] and all(state[steps][r] for r in (0, 1))
    for rank in (0, 1):  # each rank's reader moved on from where it stood
        assert state[5][rank][0][0] > state[3][rank][0][0]
    proc = run_train(small_run_args(tiny_tokens, run, "data.num_workers=1", "data.packing=split", "ckpt_path=last"))
    assert proc.returncode == 2 and "2 ranks" in proc.stderr
