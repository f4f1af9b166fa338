"""The VQGAN's training losses (taming recipe): reconstruction, LPIPS-like perceptual, PatchGAN.

Generator (autoencoder) loss per batch of images x [B, 3, R, R] in [-1, 1], reconstruction x_rec:

    nll  = rec_weight * |x - x_rec|_1 (and/or L2)  + perceptual_weight * LPIPS(x, x_rec)
    loss = nll + codebook_weight * q_loss + disc_weight * adaptive_weight * (-mean D(x_rec))

the last term only from training batch `disc_start` on; the discriminator D (PatchGAN) learns with
the hinge loss on D(x) and D(x_rec). The adaptive weight balances the two gradients at the
decoder's last layer (taming's `calculate_adaptive_weight`). The model is `vqgan.py`; the
training loop that calls these is `cm3leon.lit.vqgan_module`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQGANLossConfig:
    """Loss weights and parts; the defaults are taming's without GAN and perceptual terms."""

    rec: str = "l1"  # l1 | l2 | l1+l2
    rec_weight: float = 1.0
    codebook_weight: float = 1.0
    perceptual_weight: float = 0.0  # > 0 needs perceptual_vgg_path (a torchvision vgg16 state dict)
    perceptual_vgg_path: str | None = None
    perceptual_lin_path: str | None = None  # optional LPIPS heads (vgg.pth of taming/lpips)
    disc_enabled: bool = False  # PatchGAN + hinge loss + adaptive weight
    disc_start: int = 0  # training batch at which the GAN term switches on
    disc_weight: float = 0.8
    disc_ndf: int = 64
    disc_layers: int = 3

    def __post_init__(self) -> None:
        if self.rec not in ("l1", "l2", "l1+l2"):
            raise ValueError(f"loss.rec={self.rec!r}: expected 'l1', 'l2' or 'l1+l2'")


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix/taming (BatchNorm). [B, 3, R, R] -> logits [B, 1, R', R']"""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class LPIPS(nn.Module):
    """LPIPS-style perceptual distance on VGG16 features, weights read from local files only.

    vgg_path: a torchvision VGG16 state dict (`features.N.weight` keys, e.g. vgg16-397923af.pth).
    lin_path: optional LPIPS linear heads (taming/lpips `vgg.pth`, keys `linK.model.1.weight`);
    without it every channel weighs the same (a plain normalised feature distance).
    """

    CUTS = (4, 9, 16, 23, 30)  # after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, vgg_path: str | None, lin_path: str | None = None):
        super().__init__()
        import torchvision

        if not vgg_path or not Path(vgg_path).is_file():
            raise FileNotFoundError(
                f"perceptual loss needs VGG16 weights at loss.perceptual_vgg_path={vgg_path!r}; "
                "download torchvision's vgg16 state dict there or set loss.perceptual_weight=0"
            )
        # only VGG16's convolutional part (torchvision's `vgg16().features`, same indices)
        feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=False)
        sd = torch.load(vgg_path, map_location="cpu", weights_only=True)
        sd = {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
        feats.load_state_dict(sd, strict=True)
        self.slices = nn.ModuleList()
        start = 0
        for cut in self.CUTS:
            self.slices.append(nn.Sequential(*[feats[i] for i in range(start, cut)]))
            start = cut
        self.lin = nn.ParameterList([nn.Parameter(torch.full((1, c, 1, 1), 1.0 / c)) for c in self.CHANNELS])
        if lin_path:
            lins = torch.load(lin_path, map_location="cpu", weights_only=True)
            for i in range(len(self.CHANNELS)):
                self.lin[i].data.copy_(lins[f"lin{i}.model.1.weight"].view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen: always eval

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y [B, 3, H, W] in [-1, 1] -> distance [B]"""
        hx, hy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = 0.0
        for sl, w in zip(self.slices, self.lin):
            hx, hy = sl(hx), sl(hy)
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((nx - ny) ** 2 * w).sum(1).mean((1, 2))
        return total


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """taming: |grad nll| / |grad g_loss| at the decoder's last layer, clamped to [0, 1e4]."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class VQGANLoss(nn.Module):
    """The losses of one `VQGANLossConfig`: `perceptual` (or None) and `discriminator` (or None)."""

    def __init__(self, cfg: VQGANLossConfig, image_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.perceptual = LPIPS(cfg.perceptual_vgg_path, cfg.perceptual_lin_path) if cfg.perceptual_weight > 0 else None
        self.discriminator = (
            NLayerDiscriminator(image_channels, cfg.disc_ndf, cfg.disc_layers) if cfg.disc_enabled else None
        )

    def rec_loss(self, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        """Pixel reconstruction loss (scalar) of x, xrec [B, 3, R, R]."""
        loss = F.l1_loss(xrec, x) if "l1" in self.cfg.rec else 0.0
        return loss + F.mse_loss(xrec, x) if "l2" in self.cfg.rec else loss

    def gan_on(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc_start

    def generator_loss(
        self, x: torch.Tensor, xrec: torch.Tensor, q_loss: torch.Tensor, step: int, last_layer: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, detached parts to log) for images x, reconstructions xrec [B, 3, R, R]."""
        c = self.cfg
        rec_loss = self.rec_loss(x, xrec.float())
        nll = c.rec_weight * rec_loss
        logs = {"train/rec_loss": rec_loss.detach(), "train/q_loss": q_loss.detach()}
        if self.perceptual is not None:
            p_loss = self.perceptual(x, xrec).mean()
            nll = nll + c.perceptual_weight * p_loss
            logs["train/p_loss"] = p_loss.detach()
        loss = nll + c.codebook_weight * q_loss
        if self.gan_on(step):
            g_loss = -self.discriminator(xrec).mean()
            d_weight = adaptive_weight(nll, g_loss, last_layer) * c.disc_weight
            loss = loss + d_weight * g_loss
            logs.update({"train/g_loss": g_loss.detach(), "train/d_weight": d_weight})
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        """Hinge loss of the discriminator on real x and (detached) reconstructions xrec."""
        return hinge_d_loss(self.discriminator(x.detach()), self.discriminator(xrec.detach()))
