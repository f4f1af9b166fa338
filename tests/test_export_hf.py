"""Export for serving (src/export_hf.py, cm3leon.export_hf): a checkpoint becomes a Hugging Face
OPTForCausalLM folder with the same logits, greedy continuations and text ids as our model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cm3leon.errors import UsageError
from cm3leon.export_hf import VOCAB_FILE, check_exportable, export_hf
from cm3leon.generation.pipeline import load_lm
from cm3leon.model import CM3LeonLM, ModelConfig
from cm3leon.tokenizers.text_tokenizer import TextTokenizer
from cm3leon.vocab import Vocab
from eval_builders import BPE, make_tiny_lm
from project import PROJECT_ROOT, SHIPPED_DIR

TOL = 1e-4  # max |logit difference| in fp32


def _randomise(model: CM3LeonLM, seed: int) -> None:
    """Weights that make every part count: embeddings and positions std 0.5 (logits of a few units),
    matrices std 1/sqrt(fan_in), the residual outputs 4x that (else, with tied tables, the token's
    own embedding wins and greedy decoding repeats the last token), norm weights around 1, biases
    around 0: nothing is zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "emb" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() == 2:
                gain = 4.0 if name.endswith(("out_proj.weight", "fc2.weight")) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "ln" in name and "weight" in name else 0.0))


def rewrite_checkpoint(base: Path, path: Path, seed: int = 0, **model: object) -> Path:
    """`base` (a make_tiny_lm checkpoint) with the model's fields overridden and random weights."""
    container = torch.load(base, weights_only=True)
    hp = container["hyper_parameters"]
    hp["model"] = {**hp["model"], **model}
    lm = CM3LeonLM(ModelConfig.from_dict(hp["model"], vocab_size=Vocab.from_dict(hp["vocab"]).size))
    _randomise(lm, seed)
    container["state_dict"] = {f"model.{k}": v for k, v in lm.state_dict().items()}
    torch.save(container, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices: one thread here, one for the background command line (two processes spinning
    two threads each on two cores made every forward here ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the command line runs in the background while the in-process tests run (the two processes
# overlap instead of queueing): the checkpoint fixtures start it, the last two tests collect it ----
def _start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "src" / "export_hf.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # no thread oversubscription beside this process
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def cli_bad(tmp_path_factory):
    """`src/export_hf.py` with a checkpoint that does not exist: (process, its out folder)."""
    root = tmp_path_factory.mktemp("cli_bad")
    proc = _start_cli(f"ckpt={root / 'missing.ckpt'}", f"out={root / 'hf'}")
    yield proc, root / "hf"
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def cli_ok(ckpt, tmp_path_factory):
    """`src/export_hf.py ckpt=... out=... dtype=float16`: (process, its out folder)."""
    out = tmp_path_factory.mktemp("cli_ok") / "hf"
    proc = _start_cli(f"ckpt={ckpt}", f"out={out}", "dtype=float16")
    yield proc, out
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, cli_bad) -> Path:
    """A make_tiny_lm checkpoint (2 layers, d 64, 2 heads, 128 positions; the shipped tokenizers).
    (`cli_bad` first: it runs while Lightning imports.)"""
    return make_tiny_lm(tmp_path_factory.mktemp("export_base") / "lm.ckpt", SHIPPED_DIR / "world_vqgan.ckpt")


@pytest.fixture(scope="module")
def ckpt(base_ckpt, tmp_path_factory) -> Path:
    """The paper architecture with random weights everywhere (no zero residual outputs, a position
    table as large as the token table)."""
    return rewrite_checkpoint(base_ckpt, tmp_path_factory.mktemp("export") / "lm.ckpt", seed=1)


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory, cli_ok) -> Path:
    """`ckpt` exported in fp32 (`cli_ok` first: the command line exports it too, meanwhile)."""
    return export_hf(ckpt, tmp_path_factory.mktemp("export_out") / "hf")


def _opt(path: Path):
    from transformers import OPTForCausalLM

    return OPTForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def models(ckpt, exported) -> tuple:
    """(ours, vocab, data meta, the exported OPTForCausalLM) of `ckpt`."""
    ours, vocab, meta = load_lm(ckpt)
    return ours, vocab, meta, _opt(exported)


def _batch(vocab: Vocab, B: int, T: int, seed: int = 0) -> torch.Tensor:
    """Ids from every part of the table (text, image codes, specials) but padding rows; pad (1) included."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab.first_sentinel_id + vocab.n_sentinels, (B, T), generator=g)
    idx[:, 0] = vocab.eos_id  # as every sequence starts
    idx[0, 3] = vocab.pad_id
    return idx


def _left_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r) :], mask[b, P - len(r) :] = r, 1
    return ids, mask


def _max_diff_plain(ckpt: Path, out: Path, T: int = 48) -> float:
    ours, vocab, _ = load_lm(ckpt)
    idx = _batch(vocab, 3, T)
    with torch.no_grad():
        return float((ours(idx) - _opt(out)(idx).logits).abs().max())


# ---- logits -----------------------------------------------------------------------------------
def test_logits_match_plain_batch(models):
    ours, vocab, _, hf = models
    idx = _batch(vocab, 3, ours.config.max_seq_len)  # every position row
    with torch.no_grad():
        a, b = ours(idx), hf(idx).logits
    assert b.shape == a.shape == (3, ours.config.max_seq_len, vocab.size)
    assert a.std() > 1.0  # logits of a few units: the tolerance is meaningful
    assert (a - b).abs().max() <= TOL


def test_logits_match_left_padded_batch(models):
    ours, vocab, _, opt = models
    rows = [r[:n] for r, n in zip(_batch(vocab, 3, 40, seed=1), (40, 23, 5), strict=True)]
    ids, mask = _left_pad(rows, vocab.pad_id)
    P, lengths = ids.shape[1], mask.sum(1)
    with torch.no_grad():
        hf = opt(ids, attention_mask=mask).logits
        cache = ours.new_cache(3, max_len=P, start=P - lengths)  # our left padding: one forward
        cached = ours(ids, input_pos=torch.arange(P), cache=cache)
        for b, r in enumerate(rows):
            alone = ours(r[None])[0]  # each row by itself, no padding
            assert (hf[b, P - len(r) :] - alone).abs().max() <= TOL
            assert (cached[b, P - len(r) :] - alone).abs().max() <= TOL


def test_greedy_generate_matches(models):
    ours, vocab, _, hf = models
    rows = [r[:n] for r, n in zip(_batch(vocab, 3, 30, seed=2), (30, 12, 4), strict=True)]
    ids, mask = _left_pad(rows, vocab.pad_id)
    n_new = 8
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new)
        for b, r in enumerate(rows):
            seq = r[None]
            for _ in range(n_new):
                seq = torch.cat([seq, ours(seq)[:, -1:].argmax(-1)], dim=1)
            want = seq[0, len(r) :].tolist()
            assert len(set(want)) > 2  # a real continuation, not the last token repeated
            stop = next((i + 1 for i, t in enumerate(want) if t in (vocab.eos_id, vocab.eoss_id)), n_new)
            assert out[b, ids.shape[1] :].tolist()[:stop] == want[:stop]


# ---- the folder -------------------------------------------------------------------------------
def test_folder_config_tokenizer_and_vocab(models, exported):
    from transformers import AutoTokenizer

    _, vocab, meta, _ = models
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", VOCAB_FILE} <= names
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["OPTForCausalLM"]
    assert (config["enable_bias"], config["layer_norm_elementwise_affine"], config["do_layer_norm_before"]) == (
        False,
        False,
        True,
    )
    assert (config["vocab_size"], config["max_position_embeddings"], config["ffn_dim"]) == (vocab.size, 128, 256)
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (1, 2, 2)
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [vocab.eos_id, vocab.eoss_id]

    tok, ours = AutoTokenizer.from_pretrained(exported), TextTokenizer.from_file(BPE)
    for caption in ("a large red circle in the top left on a white background", "Zebra? 42 naïve"):
        assert tok(caption, add_special_tokens=False).input_ids == ours.encode(caption)
        assert tok(caption).input_ids == [vocab.eos_id, *ours.encode(caption)]  # </s> starts a sequence
        assert tok.decode(ours.encode(caption)) == caption
    assert (tok.pad_token_id, tok.eos_token_id, tok.padding_side) == (vocab.pad_id, vocab.eos_id, "left")

    layout = json.loads((exported / VOCAB_FILE).read_text())
    assert Vocab.from_dict(layout["vocab"]) == vocab
    assert layout["image"]["ids"] == list(vocab.image_id_range)
    assert (layout["image"]["offset"], layout["image"]["n_codes"]) == (vocab.image_offset, vocab.n_image_codes)
    assert (layout["break_id"], layout["eoss_id"], layout["sentinels"]["first_id"]) == (
        vocab.break_id,
        vocab.eoss_id,
        vocab.first_sentinel_id,
    )
    assert layout["text"]["ids"] == [0, vocab.text_size] and layout["image"]["tokenizer"] == meta["image_tokenizer"]


def test_position_table_offset(models):
    """HF row p + 2 is our position p; rows 0 and 1 (reached by pad tokens only) are zero."""
    ours, _, _, hf = models
    table = hf.model.decoder.embed_positions.weight
    assert torch.equal(table[2:], ours.pos_emb.weight) and not table[:2].any()


@pytest.mark.parametrize(
    "model",
    [
        # post-LN (no final LN in either), untied with the scale folded into the input table
        dict(pre_ln=False, activation="gelu", tie_embeddings=False, embed_scale=2.0, norm="layernorm", bias=True),
        dict(pos_emb="none", final_ln=False, norm="layernorm"),  # a zero position table, no final LN
    ],
    ids=["post_ln_gelu_untied_scaled_affine_bias", "no_positions_no_final_ln"],
)
def test_variants_that_map(base_ckpt, tmp_path, model):
    path = rewrite_checkpoint(base_ckpt, tmp_path / "lm.ckpt", seed=3, **model)
    assert _max_diff_plain(path, export_hf(path, tmp_path / "hf")) <= TOL


@pytest.mark.parametrize(
    "model, words",
    [
        (dict(norm="rmsnorm"), "model.norm=rmsnorm"),
        (dict(norm_eps=1e-6), "model.norm_eps=1e-06"),
        (dict(embed_scale=8.0), "model.embed_scale=8.0 with tied embeddings"),
    ],
)
def test_refused_configs(model, words):
    with pytest.raises(UsageError, match="cannot export to OPTForCausalLM") as e:
        check_exportable(ModelConfig(n_layer=1, d_model=16, n_head=2, vocab_size=64, **model))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_refused_checkpoint_writes_nothing(base_ckpt, tmp_path):
    path = rewrite_checkpoint(base_ckpt, tmp_path / "lm.ckpt", norm="rmsnorm", norm_eps=1e-6)
    with pytest.raises(UsageError, match="cannot export to OPTForCausalLM: model.norm=rmsnorm .*; model.norm_eps"):
        export_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_bfloat16_and_overwrite(ckpt, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(UsageError, match="overwrite=true"):
        export_hf(ckpt, out, "bfloat16")
    export_hf(ckpt, out, "bfloat16", overwrite=True)
    assert not (out / "old.txt").exists() and not (tmp_path / "hf.tmp").exists()
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(UsageError, match="dtype='int8'"):
        export_hf(ckpt, tmp_path / "other", "int8")


# ---- the command line -------------------------------------------------------------------------
def test_cli_end_to_end(cli_ok, models):
    code, out, err = _finish(cli_ok[0])
    assert code == 0, err
    assert "wrote" in out and not cli_ok[1].with_name("hf.tmp").exists()
    assert json.loads((cli_ok[1] / "config.json").read_text())["dtype"] == "float16"
    ours, vocab, _, _ = models
    idx = _batch(vocab, 2, 64)
    with torch.no_grad():  # fp16 weights, computed in fp32: only their rounding differs (~1e-2)
        assert (ours(idx) - _opt(cli_ok[1]).float()(idx).logits).abs().max() < 0.1


def test_cli_bad_checkpoint_is_one_line(cli_bad):
    code, _, err = _finish(cli_bad[0])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.ckpt" in lines[0]
    assert not cli_bad[1].exists()
