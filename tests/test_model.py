"""CM3Leon transformer: shapes, paper init, tying, causality, KV-cache parity, OPT parity, sizes."""

import time

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cm3leon.config import load_model_config
from cm3leon.errors import UsageError
from cm3leon.model import CM3LeonLM, KVCache, ModelConfig
from cm3leon.vocab import Vocab
from project import CONF_DIR


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, d_model=64, n_head=4, vocab_size=96, max_seq_len=64), **kw})


def random_model(**kw) -> CM3LeonLM:
    """Non-zero residual outputs and a larger init, so that every layer does something."""
    torch.manual_seed(0)
    return CM3LeonLM(small_cfg(zero_init_residual_out=False, init_std=0.05, pos_init_std=0.05, **kw)).eval()


def test_forward_shapes():
    model = CM3LeonLM(small_cfg())
    idx = torch.randint(0, 96, (3, 17))
    assert model(idx).shape == (3, 17, 96)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_paper_init_statistics():
    torch.manual_seed(0)
    model = CM3LeonLM(ModelConfig(n_layer=2, d_model=128, n_head=4, vocab_size=1024, max_seq_len=256))
    std = 0.006 * 0.9866  # std of a normal truncated at 3 sigma
    for name, p in model.named_parameters():
        assert "bias" not in name
        if name.endswith(("out_proj.weight", "fc2.weight")):
            assert torch.count_nonzero(p) == 0, f"{name} must start at 0"
        elif name == "pos_emb.weight":
            assert p.std().item() == pytest.approx(0.0002 * 0.9866, rel=0.03)
            assert p.abs().max() <= 3 * 0.0002 + 1e-9
        else:
            assert p.std().item() == pytest.approx(std, rel=0.03), name
            assert p.abs().max() <= 3 * 0.006 + 1e-9 and p.abs().max() > 2.5 * 0.006, name
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 and all(m.weight is None and m.bias is None for m in norms)
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    # with zero residual outputs the blocks are the identity: logits = LN(tok + pos) @ E^T
    idx = torch.randint(0, 1024, (1, 8))
    h = F.layer_norm(model.tok_emb(idx) + model.pos_emb.weight[:8], (128,))
    torch.testing.assert_close(model(idx), h @ model.tok_emb.weight.T)


def test_tied_embeddings_and_param_count():
    model = CM3LeonLM(small_cfg())
    assert model.lm_head.weight is model.tok_emb.weight
    d, V, L, T = 64, 96, 2, 64
    body = L * (4 * d * d + 2 * 4 * d * d)
    assert model.num_params(exclude_embeddings=True) == body
    assert model.num_params() == body + V * d + T * d
    assert model.flops_per_token(10) == 6 * (body + V * d) + 12 * L * d * 10
    untied = CM3LeonLM(small_cfg(tie_embeddings=False))
    assert untied.num_params() == body + 2 * V * d + T * d and untied.num_params(True) == body


def test_causal():
    model = random_model()
    idx = torch.randint(0, 96, (2, 20))
    ref = model(idx)
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 96
    out = model(changed)
    torch.testing.assert_close(out[:, :12], ref[:, :12])
    assert (out[:, 12:] - ref[:, 12:]).abs().amax(-1).min() > 1e-4  # and the future does change


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_kv_cache_matches_full_forward(attn_impl):
    model = random_model(attn_impl=attn_impl)
    B, T, T0 = 3, 24, 9
    idx = torch.randint(0, 96, (B, T))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(B, max_len=32)
        assert isinstance(cache, KVCache) and cache.k[0].shape == (B, 4, 32, 16)
        k_ptr = cache.k[0].data_ptr()
        steps = [model(idx[:, :T0], input_pos=torch.arange(T0), cache=cache)]  # prefill
        for t in range(T0, T):  # one token per step
            steps.append(model(idx[:, t : t + 1], input_pos=torch.tensor([t]), cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    assert cache.k[0].data_ptr() == k_ptr  # static buffers, written in place
    # a chunked prefill gives the same too
    with torch.no_grad():
        cache.reset()
        a = model(idx[:, :5], input_pos=torch.arange(5), cache=cache)
        b = model(idx[:, 5:T], input_pos=torch.arange(5, T), cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-4, rtol=0)


def test_sdpa_matches_math_attention():
    idx = torch.randint(0, 96, (2, 30))
    torch.testing.assert_close(random_model()(idx), random_model(attn_impl="math")(idx), atol=1e-5, rtol=0)


def test_activation_checkpointing_same_gradients():
    idx = torch.randint(0, 96, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = random_model(activation_checkpointing=ckpt).train()
        model(idx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_post_ln_and_options_build():
    idx = torch.randint(0, 96, (1, 8))
    for kw in (
        dict(pre_ln=False),
        dict(norm="layernorm", bias=True),
        dict(norm="rmsnorm", activation="gelu"),
        dict(pos_emb="none", embed_scale=8.0),
        dict(dropout=0.1),
    ):
        assert random_model(**kw)(idx).shape == (1, 8, 96)
    with pytest.raises(UsageError, match="norm"):
        small_cfg(norm="batchnorm")
    with pytest.raises(UsageError, match="divisible"):
        small_cfg(n_head=5)


def test_matches_hf_opt_with_same_weights():
    """Parity with Hugging Face OPT configured as the paper's architecture (same weights copied)."""
    from cm3leon.bench.train_step import hf_opt_reference

    model = random_model()
    hf = hf_opt_reference(model.config).eval()
    d = model.config.d_model
    dec = hf.model.decoder
    with torch.no_grad():
        dec.embed_tokens.weight.copy_(model.tok_emb.weight)
        dec.embed_positions.weight[2:].copy_(model.pos_emb.weight)  # OPT offsets positions by 2
        for ours, theirs in zip(model.blocks, dec.layers):
            q, k, v = ours.attn.qkv.weight.split(d)
            theirs.self_attn.q_proj.weight.copy_(q)
            theirs.self_attn.k_proj.weight.copy_(k)
            theirs.self_attn.v_proj.weight.copy_(v)
            theirs.self_attn.out_proj.weight.copy_(ours.attn.out_proj.weight)
            theirs.fc1.weight.copy_(ours.mlp.fc1.weight)
            theirs.fc2.weight.copy_(ours.mlp.fc2.weight)
    assert sum(p.numel() for p in hf.parameters()) == model.num_params() + 2 * d  # OPT's 2 offset rows
    idx = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(input_ids=idx, use_cache=False).logits, atol=1e-5, rtol=1e-5)


# ---- sizes -------------------------------------------------------------------------------------
# Only what differs between sizes is in conf/model/<size>.yaml; every other field is ModelConfig's
# default through the `model_schema` (cm3leon/config.py).
SIZE_KEYS = {"defaults", "name", "n_layer", "d_model", "n_head", "max_seq_len", "recipe"}


def test_meta_device_7b_is_instant_and_sizes_match_paper():
    paper = {"350m": 0.35e9, "760m": 0.76e9, "7b": 6.7e9}
    for name, target in paper.items():
        t0 = time.perf_counter()
        with torch.device("meta"):
            model = CM3LeonLM(load_model_config(CONF_DIR, name))
        assert time.perf_counter() - t0 < 5.0
        assert model.tok_emb.weight.is_meta and model.config.vocab_size == Vocab.paper().size
        assert abs(model.num_params() / target - 1) < 0.10, (name, model.num_params())
    assert model.num_params() == 6_729_793_536  # 7b, vocab 66,056, seq 4096


def test_size_yamls_hold_only_what_differs(compose_config):
    sizes = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    assert sizes == ["350m", "760m", "7b", "tiny"]
    for name in sizes:
        raw = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
        assert set(raw) <= SIZE_KEYS and raw.defaults == ["model_schema", "_self_"], name
        node = compose_config("train", [f"model={name}"]).model  # as Hydra hands it to the LightningModule
        assert node.name == name and set(node.recipe) == {"lr", "warmup_steps", "global_batch_tokens"}
        differs = {k: raw[k] for k in ("n_layer", "d_model", "n_head", "max_seq_len")}
        # everything else is the paper's default (ModelConfig); vocab_size null -> the data's
        assert node.vocab_size is None
        assert ModelConfig.from_dict(node) == ModelConfig(name=name, **differs)
        assert ModelConfig.from_dict(node, vocab_size=123).vocab_size == 123
    recipe = compose_config("train", ["model=7b"]).model.recipe  # PAPER.md section 2
    assert recipe.lr == 1.2e-4 and recipe.global_batch_tokens == 2048 * 4096
    assert load_model_config(CONF_DIR, "350m", max_seq_len=2048).max_seq_len == 2048
    with pytest.raises(UsageError, match="unknown model size"):
        load_model_config(CONF_DIR, "13b")


def test_every_model_field_is_a_typed_override(compose_config):
    from hydra.errors import ConfigCompositionException

    node = compose_config("train", ["model=350m", "model.n_layer=2", "model.norm=rmsnorm", "model.bias=true"]).model
    cfg = ModelConfig.from_dict(node)
    assert (cfg.n_layer, cfg.norm, cfg.bias, cfg.d_model) == (2, "rmsnorm", True, 1024)
    with pytest.raises(ConfigCompositionException):
        compose_config("train", ["model.n_layers=2"])  # a typo names itself at compose time
    with pytest.raises(ConfigCompositionException):
        compose_config("train", ["model.n_layer=two"])  # typed: not an int
    added = compose_config("train", ["+model.n_layers=3"]).model  # forced in with +: refused when built
    with pytest.raises(UsageError, match="unknown keys"):
        ModelConfig.from_dict(added)
    with pytest.raises(UsageError, match=r"model\.norm"):
        ModelConfig.from_dict(compose_config("train", ["model.norm=batchnorm"]).model)


@pytest.mark.slow
def test_bench_train_step_runs():
    from cm3leon.bench.train_step import bench_train_step

    r = bench_train_step("cpu", conf_dir=CONF_DIR, batch_size=1, seq_len=32, vocab_size=512, steps=1, warmup=0)
    assert r["ours_ms"] > 0 and r["hf_ms"] > 0 and r["speedup"] == r["hf_ms"] / r["ours_ms"]
    assert r["params_hf"] == r["params_ours"] + 2 * 256  # same model up to OPT's 2 offset rows
