"""VQGAN image tokenizer with the taming-transformers `VQModel` state-dict layout.

The module tree (and so every state-dict key and shape) follows taming's
`taming/models/vqgan.py::VQModel`, `taming/modules/diffusionmodules/model.py` and
`taming/modules/vqvae/quantize.py::VectorQuantizer2` (legacy beta), so checkpoints trained with
taming (Make-A-Scene lineage) or Chameleon's released tokenizer load strictly:

    encoder.conv_in, encoder.down.{i}.block.{j}, encoder.down.{i}.attn.{j}, encoder.down.{i}.downsample.conv,
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out,
    decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{j}, decoder.up.{i}.attn.{j},
    decoder.up.{i}.upsample.conv, decoder.norm_out, decoder.conv_out,
    quant_conv, post_quant_conv, quantize.embedding.weight

An image [B, 3, R, R] in [-1, 1] becomes a grid of codes [B, R/f, R/f], f = 2 ** (len(ch_mult) - 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Top-level submodules of VQModel: every key of a VQGAN state dict starts with one of these.
VQ_KEY_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")


@dataclass
class VQGANConfig:
    """Architecture of a taming VQModel (field names are taming's `ddconfig` names + n_embed, embed_dim).

    The defaults are the paper's tokenizer (256 px -> 32x32 codes, 8192 entries), written only here:
    the named configs (`configs/tokenizer/*.yaml`) hold what differs, and Hydra composes them onto
    this dataclass (its schema, `cm3leon.lit.vqgan_module.register_configs`).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 8192
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    double_z: bool = False
    num_groups: int = 32  # GroupNorm groups; taming fixes 32, tiny models need fewer
    beta: float = 0.25  # commitment weight of VectorQuantizer2

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        for c in {self.ch * m for m in self.ch_mult}:
            if c % self.num_groups:
                raise ValueError(
                    f"VQGAN channels {c} not divisible by num_groups={self.num_groups}; change ch or num_groups"
                )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of the downsampling factor {self.downsample_factor}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the code grid."""
        return self.resolution // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return self.latent_size**2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQGANConfig":
        """From our flat dict, or a taming/Chameleon yaml dict (`model.params.ddconfig`, `n_embed`, `embed_dim`)."""
        d = dict(d)
        if "model" in d and isinstance(d["model"], dict):  # taming-style yaml root
            d = dict(d["model"].get("params", d["model"]))
        if "ddconfig" in d:  # taming VQModel params
            flat = dict(d["ddconfig"])
            for k in ("n_embed", "embed_dim"):
                if k in d:
                    flat[k] = d[k]
            d = flat
        names = {f.name for f in fields(cls)}
        # taming ddconfig keys that do not change the weights (e.g. give_pre_end) are dropped
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_taming_yaml_dict(self) -> dict[str, Any]:
        """The taming/Chameleon yaml layout (`model.params.ddconfig`), readable by taming itself."""
        d = self.to_dict()
        top = {k: d.pop(k) for k in ("n_embed", "embed_dim", "beta")}
        return {
            "model": {
                "target": "taming.models.vqgan.VQModel",
                "params": {
                    "embed_dim": top["embed_dim"],
                    "n_embed": top["n_embed"],
                    "beta": top["beta"],
                    "ddconfig": d,
                },
            }
        }


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, plus a 1x1 `nin_shortcut` when channels change. [B, Cin, H, W] -> [B, Cout, H, W]"""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, num_groups: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 convs q, k, v, proj_out."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C]: one head of width C (taming scales by C ** -0.5, as SDPA does)
        q, k, v = (t(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (0, 1, 0, 1) padding. [B, C, H, W] -> [B, C, H/2, W/2]"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv. [B, C, H, W] -> [B, C, 2H, 2W]"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _mid(channels: int, cfg: VQGANConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg.dropout, cfg.num_groups)
    mid.attn_1 = AttnBlock(channels, cfg.num_groups)
    mid.block_2 = ResnetBlock(channels, channels, cfg.dropout, cfg.num_groups)
    return mid


class Encoder(nn.Module):
    """[B, in_channels, R, R] -> [B, z_channels (x2 if double_z), R/f, R/f]"""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        in_mult = (1, *cfg.ch_mult)
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            c_in, c_out = cfg.ch * in_mult[i], cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout, cfg.num_groups))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_out, cfg.num_groups))
            level = _level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
        self.mid = _mid(c_out, cfg)
        self.norm_out = group_norm(c_out, cfg.num_groups)
        self.conv_out = nn.Conv2d(c_out, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, R/f, R/f] -> [B, out_ch, R, R]"""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.latent_size
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, 1, 1)
        self.mid = _mid(c_in, cfg)
        levels = []
        for i in reversed(range(n)):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout, cfg.num_groups))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_out, cfg.num_groups))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c_out)
                res *= 2
            levels.insert(0, level)  # up[i] is the level at resolution R / 2**i, as in taming
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in, cfg.num_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """taming `VectorQuantizer2` (legacy=True): nearest code by L2, straight-through gradient.

    Loss (legacy, beta on the codebook term, as in the released taming models):
        mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, h, w] -> nearest code ids [B, h, w]"""
        b, d, h, w = z.shape
        # fp32 even under autocast: bf16 distances would pick different codes
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float().permute(0, 2, 3, 1).reshape(-1, d)
            e = self.embedding.weight.float()
            dist = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()
        return dist.argmin(1).view(b, h, w)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, h, w] -> (z_q [B, D, h, w] straight-through, loss scalar, codes [B, h, w])"""
        z = z.float()
        idx = self.codes(z)
        z_q = self.embed(idx)
        loss = F.mse_loss(z_q.detach(), z) + self.beta * F.mse_loss(z_q, z.detach())
        z_q = z + (z_q - z).detach()
        return z_q, loss, idx

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> vectors [B, D, h, w]"""
        return self.embedding(idx).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """taming `VQModel` without its loss: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        if cfg.double_z:
            raise ValueError("double_z=True is a KL-autoencoder setting; a VQGAN needs double_z=False")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """images [B, 3, R, R] in [-1, 1] -> continuous latents [B, embed_dim, R/f, R/f]"""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B, 3, R, R] -> (z_q [B, D, h, w], q_loss, codes [B, h, w])"""
        return self.quantize(self.encode_pre_quant(x))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q [B, D, h, w] -> images [B, 3, R, R] (unclamped)"""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] (or [B, h*w] for a square grid) -> images [B, 3, R, R] (unclamped)"""
        if codes.dim() == 2:
            side = round(codes.shape[1] ** 0.5)
            if side * side != codes.shape[1]:
                raise ValueError(f"cannot make a square code grid from {codes.shape[1]} codes")
            codes = codes.view(codes.shape[0], side, side)
        return self.decode(self.quantize.embed(codes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B, 3, R, R] -> (reconstruction [B, 3, R, R], q_loss, codes [B, h, w])"""
        z_q, q_loss, codes = self.encode(x)
        return self.decode(z_q), q_loss, codes
