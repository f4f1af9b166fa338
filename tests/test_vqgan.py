"""VQGAN architecture: taming key layout, strict loading from the usual containers, parity with taming's math."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from cm3leon.tokenizers import ImageTokenizer, VQGANConfig, VQModel
from cm3leon.tokenizers.image_tokenizer import extract_vq_state_dict, resolve_config
from cm3leon.tokenizers.vqgan import AttnBlock, Downsample

# A taming-layout model small enough for fast tests, with every kind of block (attention in a level,
# nin_shortcut, downsample, upsample).
SMALL = dict(
    ch=32,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[8],
    z_channels=8,
    embed_dim=4,
    n_embed=16,
    resolution=16,
    num_groups=8,
)


def test_paper256_has_taming_keys_and_shapes():
    sd = VQModel(resolve_config("paper256")).state_dict()
    expected = {  # read off taming-transformers' VQModel with the paper256 ddconfig
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
        "encoder.down.3.attn.1.proj_out.weight": (512, 512, 1, 1),  # attn at resolution 32
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.norm_out.bias": (512,),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (256, 256, 1, 1),
        "quantize.embedding.weight": (8192, 256),
        "post_quant_conv.bias": (256,),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.mid.block_2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.3.attn.2.k.weight": (512, 512, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.2.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    # levels without attention, the top level without downsample, the bottom level without upsample
    for absent in (
        "encoder.down.0.attn.0.q.weight",
        "encoder.down.3.downsample.conv.weight",
        "decoder.up.0.upsample.conv.weight",
        "decoder.up.2.attn.0.q.weight",
    ):
        assert absent not in sd
    assert len(sd) == 299  # every parameter, no buffers
    assert all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")) for k in sd)


def test_config_geometry():
    for name, side in (("paper256", 32), ("chameleon512", 32), ("tiny", 8)):
        cfg = resolve_config(name)
        assert cfg.latent_size == side and cfg.tokens_per_image == side * side
    with pytest.raises(ValueError, match="num_groups"):
        VQGANConfig(ch=16, num_groups=32)


def _chameleon_like_checkpoint(path, cfg, prefix=""):
    """A training checkpoint as Lightning/taming leave it: prefixed model keys plus loss keys."""
    sd = {prefix + k: v for k, v in VQModel(cfg).state_dict().items()}
    sd["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    sd["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": sd, "epoch": 3}, path)
    return sd


def test_chameleon512_strict_load_keys(tmp_path, caplog):
    cfg = resolve_config("chameleon512")
    path = tmp_path / "vqgan.ckpt"
    saved = _chameleon_like_checkpoint(path, cfg)
    with caplog.at_level(logging.DEBUG, logger="cm3leon.tokenizers.image_tokenizer"):
        tok = ImageTokenizer.from_checkpoint(path, config="chameleon512")
    assert "loss.logvar" in caplog.text  # ignored keys are named in the debug log
    for k, v in tok.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert tok.tokens_per_image == 1024 and tok.n_codes == 8192 and tok.resolution == 512


@pytest.mark.slow
def test_chameleon512_encode_decode_512px(tmp_path):
    cfg = resolve_config("chameleon512")
    path = tmp_path / "vqgan.ckpt"
    _chameleon_like_checkpoint(path, cfg)
    tok = ImageTokenizer.from_checkpoint(path, config="chameleon512")
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (1, 1024) and codes.dtype == torch.int64
    out = tok.decode(codes)
    assert out.shape == (1, 3, 512, 512) and out.abs().max() <= 1


def test_strict_load_encode_decode_small(tmp_path):
    """The same path as the 512 px test at a size the default suite can afford."""
    cfg = VQGANConfig(**SMALL)
    path = tmp_path / "small.pt"
    model = VQModel(cfg)
    torch.save({"model." + k: v for k, v in model.state_dict().items()}, path)  # plain, prefixed
    tok = ImageTokenizer.from_checkpoint(path, config=SMALL)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (3, 64) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    out = tok.decode(codes)
    assert out.shape == (3, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    # the tokenizer's codes are the model's own argmin codes, and decode == the model's decoder
    with torch.no_grad():
        _, _, ref_codes = model.encode(x)
        ref = model.decode_codes(ref_codes).clamp(-1, 1)
    assert torch.equal(codes, ref_codes.flatten(1))
    torch.testing.assert_close(out, ref)


def test_safetensors_and_yaml_beside(tmp_path):
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    cfg = VQGANConfig(**SMALL)
    path = tmp_path / "tok.safetensors"
    save_file(VQModel(cfg).state_dict(), str(path))
    # a taming/Chameleon-style yaml beside the weights, same stem
    OmegaConf.save(OmegaConf.create(cfg.to_taming_yaml_dict()), tmp_path / "tok.yaml")
    tok = ImageTokenizer.from_checkpoint(path)
    assert tok.config == cfg


def test_lightning_hparams_give_the_architecture(tmp_path):
    cfg = VQGANConfig(**SMALL)
    path = tmp_path / "last.ckpt"
    sd = {"vqgan." + k: v for k, v in VQModel(cfg).state_dict().items()}
    sd["discriminator.main.0.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd, "hyper_parameters": {"tokenizer": cfg.to_dict(), "optim": {"lr": 1e-4}}}, path)
    assert ImageTokenizer.from_checkpoint(path).config == cfg


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        ImageTokenizer.from_checkpoint(tmp_path / "nope.ckpt", config="tiny")
    path = tmp_path / "small.pt"
    torch.save(VQModel(VQGANConfig(**SMALL)).state_dict(), path)
    with pytest.raises(ValueError, match="no architecture"):
        ImageTokenizer.from_checkpoint(path)
    with pytest.raises(RuntimeError, match="do not match"):  # wrong architecture: strict
        ImageTokenizer.from_checkpoint(path, config={**SMALL, "n_embed": 32})
    with pytest.raises(RuntimeError, match="do not match"):  # a missing key is an error, not ignored
        sd = VQModel(VQGANConfig(**SMALL)).state_dict()
        del sd["decoder.conv_out.bias"]
        torch.save(sd, path)
        ImageTokenizer.from_checkpoint(path, config=SMALL)
    with pytest.raises(KeyError, match=r"quantize\.embedding\.weight"):
        extract_vq_state_dict({"foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown tokenizer config"):
        resolve_config("huge")


def test_decode_rejects_bad_codes():
    tok = ImageTokenizer.from_config(SMALL)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        tok.decode(torch.full((1, 64), 16))
    with pytest.raises(ValueError, match="64"):
        tok.decode(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="resize"):
        tok.encode(torch.zeros(1, 3, 32, 32))


def test_attention_matches_taming_formula():
    torch.manual_seed(0)
    blk = AttnBlock(32, num_groups=8)
    x = torch.randn(2, 32, 5, 7)
    # taming's AttnBlock.forward, written out with bmm
    h = blk.norm(x)
    q, k, v = blk.q(h), blk.k(h), blk.v(h)
    b, c, hh, ww = q.shape
    w_ = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c**-0.5
    w_ = F.softmax(w_, dim=2)
    out = torch.bmm(v.reshape(b, c, -1), w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
    ref = x + blk.proj_out(out)
    torch.testing.assert_close(blk(x), ref, rtol=1e-4, atol=1e-5)


def test_downsample_pads_right_bottom_like_taming():
    d = Downsample(4)
    x = torch.randn(1, 4, 8, 8)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), d.conv.weight, d.conv.bias, stride=2)
    assert torch.equal(d(x), ref) and d(x).shape == (1, 4, 4, 4)


def test_quantizer_loss_and_straight_through():
    torch.manual_seed(0)
    model = VQModel(VQGANConfig(**SMALL))
    q = model.quantize
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, loss, idx = q(z)
    e = q.embedding.weight[idx].permute(0, 3, 1, 2)
    # nearest code by brute force
    d = ((z.detach().permute(0, 2, 3, 1)[..., None, :] - q.embedding.weight) ** 2).sum(-1)
    assert torch.equal(idx, d.argmin(-1))
    # legacy taming loss: mean((sg[e]-z)^2) + beta * mean((e-sg[z])^2); values are equal, gradients differ
    torch.testing.assert_close(loss, (1 + 0.25) * ((e - z) ** 2).mean())
    torch.testing.assert_close(z_q, e)
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through: d z_q / d z = identity
