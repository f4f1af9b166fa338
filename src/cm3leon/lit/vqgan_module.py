"""LightningModule that trains the VQGAN image tokenizer (taming recipe, sized down for CPU).

Loss of the generator (autoencoder), per batch of images x [B, 3, R, R] in [-1, 1]:

    rec_weight * |x - x_rec|_1 (or L2)  + perceptual_weight * LPIPS(x, x_rec)     (= nll)
  + codebook_weight * q_loss   (VectorQuantizer2, legacy beta 0.25; commitment only with EMA codes)
  + disc_factor * adaptive_weight * (-mean D(x_rec))                               (after disc_start)

and of the PatchGAN discriminator: hinge loss on D(x) and D(x_rec). Optimisation is manual (one
optimizer, or two with the GAN). Codebook health is logged over the last `codebook.window` batches
(usage fraction, perplexity, dead codes); dead codes are restarted from random recent encoder
outputs every `codebook.restart_every` steps, or the codebook is trained by EMA (`codebook.ema`).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from cm3leon.tokenizers.image_processing import postprocess
from cm3leon.tokenizers.vqgan import VQGANConfig, VQModel

log = logging.getLogger(__name__)


# ---- losses -------------------------------------------------------------------------------------
class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix/taming (BatchNorm). [B, 3, R, R] -> logits [B, 1, R', R']"""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
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

    def __init__(self, vgg_path: str, lin_path: str | None = None):
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
        sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
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

    def train(self, mode: bool = True) -> "LPIPS":
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


# ---- the module ---------------------------------------------------------------------------------
class VQGANModule(L.LightningModule):
    """Trains `VQModel` (attribute `vqgan`, so checkpoint keys are `vqgan.<taming key>`).

    Args (plain dicts, as composed by conf/train_tokenizer.yaml):
        tokenizer: VQGANConfig fields.
        optim: lr, betas, weight_decay, warmup_steps, min_lr_ratio, total_steps, grad_clip, disc_lr.
        loss: rec ("l1"|"l2"), rec_weight, codebook_weight, perceptual_weight, perceptual_vgg_path,
              perceptual_lin_path, disc_enabled, disc_start, disc_weight, disc_ndf, disc_layers.
        codebook: window, restart_every, restart_until (a step, or a fraction of total_steps if <= 1), ema, ema_decay.
        val: caption_accuracy (bool), caption_samples (int).
        crop: size (px, or null), until (fraction of total_steps): train on random crops aligned to the
              code grid first, full images after (a 32 px crop of a 64 px image costs 4x less).
        decoder_only: train post_quant_conv + decoder only; the encoder, quant_conv and codebook are
              frozen and codes are never restarted, so every code (and every token shard made with
              these weights) stays valid while reconstructions improve.
    """

    def __init__(
        self,
        tokenizer: dict[str, Any],
        optim: dict[str, Any] | None = None,
        loss: dict[str, Any] | None = None,
        codebook: dict[str, Any] | None = None,
        val: dict[str, Any] | None = None,
        crop: dict[str, Any] | None = None,
        decoder_only: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.cfg = VQGANConfig.from_dict(dict(tokenizer))
        self.optim_cfg = {"lr": 1e-4, "betas": (0.5, 0.9), "weight_decay": 0.0, "warmup_steps": 0,
                          "min_lr_ratio": 1.0, "total_steps": 0, "grad_clip": 0.0, "disc_lr": None, **(optim or {})}
        self.loss_cfg = {"rec": "l1", "rec_weight": 1.0, "codebook_weight": 1.0, "perceptual_weight": 0.0,
                         "perceptual_vgg_path": None, "perceptual_lin_path": None, "disc_enabled": False,
                         "disc_start": 0, "disc_weight": 0.8, "disc_ndf": 64, "disc_layers": 3, **(loss or {})}
        self.cb_cfg = {"window": 50, "restart_every": 0, "restart_until": None, "ema": False, "ema_decay": 0.99,
                       **(codebook or {})}
        self.val_cfg = {"caption_accuracy": False, "caption_samples": 1000, **(val or {})}
        self.decoder_only = bool(decoder_only)
        self.crop_cfg = {"size": None, "until": 0.0, **(crop or {})}
        if self.loss_cfg["rec"] not in ("l1", "l2", "l1+l2"):
            raise ValueError(f"loss.rec={self.loss_cfg['rec']!r}: expected 'l1', 'l2' or 'l1+l2'")

        self.vqgan = VQModel(self.cfg)
        self.perceptual = None
        if self.loss_cfg["perceptual_weight"] > 0:
            self.perceptual = LPIPS(self.loss_cfg["perceptual_vgg_path"], self.loss_cfg["perceptual_lin_path"])
        self.discriminator = None
        if self.loss_cfg["disc_enabled"]:
            self.discriminator = NLayerDiscriminator(self.cfg.out_ch, self.loss_cfg["disc_ndf"], self.loss_cfg["disc_layers"])
        if self.decoder_only:
            if self.cb_cfg["ema"]:
                raise ValueError("decoder_only keeps the codebook fixed: it cannot be combined with codebook.ema")
            # the encoder, quant_conv and codebook define the codes: frozen, existing token shards stay valid
            for m in (self.vqgan.encoder, self.vqgan.quant_conv, self.vqgan.quantize):
                m.requires_grad_(False)
        if self.cb_cfg["ema"]:
            n, d = self.cfg.n_embed, self.cfg.embed_dim
            self.vqgan.quantize.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.zeros(n))
            self.register_buffer("ema_embed_sum", self.vqgan.quantize.embedding.weight.detach().clone())
        # Codebook statistics over recent batches (not checkpointed: they refill in `window` steps).
        self._counts: deque[torch.Tensor] = deque(maxlen=int(self.cb_cfg["window"]))
        self._recent_z: deque[torch.Tensor] = deque(maxlen=8)
        self._val_images: list = []
        self._val_captions: list[str] = []
        self._val_codes: list[torch.Tensor] = []
        self._steps_done = 0  # training batches seen (Lightning's global_step counts both optimizers)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B, 3, R, R] -> (reconstruction, q_loss, codes [B, h, w])"""
        return self.vqgan(x)

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, h, w] -> (z_q straight-through, q_loss, codes); EMA mode updates the codebook."""
        q = self.vqgan.quantize
        if not self.cb_cfg["ema"]:
            return q(z)
        z = z.float()
        codes = q.codes(z)
        z_q = q.embed(codes)
        q_loss = q.beta * F.mse_loss(z, z_q.detach())  # commitment only: codes move by EMA
        if self.training:
            self._ema_update(z.detach(), codes)
        return z + (z_q - z).detach(), q_loss, codes

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        decay, n = self.cb_cfg["ema_decay"], self.cfg.n_embed
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = codes.reshape(-1)
        counts = torch.bincount(idx, minlength=n).to(flat.dtype)
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, flat)
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + 1e-5) / (total + n * 1e-5) * total  # Laplace smoothing
        self.vqgan.quantize.embedding.weight.copy_(self.ema_embed_sum / size[:, None])

    def _rec_loss(self, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        rec = self.loss_cfg["rec"]
        loss = F.l1_loss(xrec, x) if "l1" in rec else 0.0
        return loss + F.mse_loss(xrec, x) if "l2" in rec else loss

    def _train_view(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Random crops [B, 3, S, S] of x, at offsets on the code grid (multiples of f), early in training."""
        size, until = self.crop_cfg["size"], self.crop_cfg["until"]
        if not size or size >= x.shape[-1] or step >= until * max(1, self.optim_cfg["total_steps"]):
            return x
        f = self.cfg.downsample_factor
        n_off = (x.shape[-1] - size) // f + 1
        off = torch.randint(n_off, (x.shape[0], 2)) * f
        return torch.stack([im[:, i : i + size, j : j + size] for im, (i, j) in zip(x, off.tolist())])

    # ---- training ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        opts = self.optimizers()
        opt_g, opt_d = (opts if isinstance(opts, (list, tuple)) else (opts, None))
        step = self._step_count()
        lc = self.loss_cfg
        x = self._train_view(batch["image"], step)

        with torch.set_grad_enabled(not self.decoder_only):
            z = self.vqgan.encode_pre_quant(x)
            z_q, q_loss, codes = self._quantize(z)
        xrec = self.vqgan.decode(z_q)
        rec_loss = self._rec_loss(x, xrec.float())
        nll = lc["rec_weight"] * rec_loss
        logs = {"train/rec_loss": rec_loss.detach(), "train/q_loss": q_loss.detach()}
        if self.perceptual is not None:
            p_loss = self.perceptual(x, xrec).mean()
            nll = nll + lc["perceptual_weight"] * p_loss
            logs["train/p_loss"] = p_loss.detach()
        loss = nll + lc["codebook_weight"] * q_loss

        gan_on = self.discriminator is not None and step >= lc["disc_start"]
        if gan_on:
            g_loss = -self.discriminator(xrec).mean()
            d_weight = self._adaptive_weight(nll, g_loss) * lc["disc_weight"]
            loss = loss + d_weight * g_loss
            logs.update({"train/g_loss": g_loss.detach(), "train/d_weight": d_weight})

        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.optim_cfg["grad_clip"]:
            self.clip_gradients(opt_g, gradient_clip_val=self.optim_cfg["grad_clip"], gradient_clip_algorithm="norm")
        opt_g.step()

        if gan_on:
            logits_real = self.discriminator(x.detach())
            logits_fake = self.discriminator(xrec.detach())
            d_loss = hinge_d_loss(logits_real, logits_fake)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            logs["train/d_loss"] = d_loss.detach()

        for sch in self._schedulers():
            sch.step()
        self._track_codes(codes, z.detach())
        self._maybe_restart_codes(step)
        logs.update(self.codebook_stats())
        logs["train/loss"] = loss.detach()
        logs["train/lr"] = opt_g.param_groups[0]["lr"]
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("rec", rec_loss.detach(), prog_bar=True, on_step=True, logger=False, batch_size=x.shape[0])
        self._steps_done += 1
        return loss.detach()

    def _adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """taming: |grad nll| / |grad g_loss| at the decoder's last layer, clamped to [0, 1e4]."""
        last = self.vqgan.decoder.conv_out.weight
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    # ---- codebook health --------------------------------------------------------------------
    def _step_count(self) -> int:
        return self._steps_done

    @torch.no_grad()
    def _track_codes(self, codes: torch.Tensor, z: torch.Tensor) -> None:
        self._counts.append(torch.bincount(codes.reshape(-1), minlength=self.cfg.n_embed).cpu())
        self._recent_z.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu())

    def codebook_stats(self) -> dict[str, float]:
        """usage: fraction of codes used in the last `window` batches; perplexity of their frequencies."""
        if not self._counts:
            return {}
        counts = torch.stack(list(self._counts)).sum(0).double()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum()).item()
        used = int((counts > 0).sum())
        return {"train/codebook_usage": used / self.cfg.n_embed, "train/perplexity": perplexity,
                "train/dead_codes": float(self.cfg.n_embed - used)}

    @torch.no_grad()
    def _maybe_restart_codes(self, step: int) -> None:
        """Every `restart_every` steps, move codes unused over the window onto random recent encoder outputs."""
        every, until = int(self.cb_cfg["restart_every"] or 0), self.cb_cfg["restart_until"]
        if self.decoder_only:
            return  # a restarted code could win the nearest-code search: the codes must not change
        if until is not None and until <= 1 and self.optim_cfg["total_steps"]:
            until = until * self.optim_cfg["total_steps"]  # a fraction of the run
        if every <= 0 or (step + 1) % every or (until is not None and step >= until):
            return
        if len(self._counts) < min(self._counts.maxlen, every):
            return  # not enough history to call a code dead
        dead = (torch.stack(list(self._counts)).sum(0) == 0).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        pool = torch.cat(list(self._recent_z))
        pick = pool[torch.randint(len(pool), (dead.numel(),))]
        pick = pick + 0.01 * pick.std() * torch.randn_like(pick)  # split clusters, not duplicate them
        weight = self.vqgan.quantize.embedding.weight
        weight[dead.to(weight.device)] = pick.to(weight)
        if self.cb_cfg["ema"]:
            self.ema_embed_sum[dead] = pick.to(weight)
            self.ema_cluster_size[dead] = 1.0
        # the restarted codes must not count as dead again before they had a chance to be used
        self._counts.clear()
        if self._trainer is not None:
            self.log("train/restarted_codes", float(dead.numel()), on_step=True, on_epoch=False)

    # ---- validation -------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        xrec, q_loss, codes = self.vqgan(x)
        xrec = xrec.clamp(-1, 1)
        self.log("val/rec_loss", self._rec_loss(x, xrec), on_epoch=True, batch_size=x.shape[0], prog_bar=True)
        self.log("val/q_loss", q_loss, on_epoch=True, batch_size=x.shape[0])
        self._val_codes.append(codes.reshape(-1).cpu())
        if self.val_cfg["caption_accuracy"] and len(self._val_captions) < self.val_cfg["caption_samples"]:
            self._val_images.extend(postprocess(xrec))
            self._val_captions.extend(batch["caption"])

    def on_validation_epoch_start(self) -> None:
        self._val_images, self._val_captions, self._val_codes = [], [], []

    def on_validation_epoch_end(self) -> None:
        if self._val_codes:
            used = torch.unique(torch.cat(self._val_codes)).numel()
            self.log("val/codebook_usage", used / self.cfg.n_embed)
        if self._val_captions:
            acc = caption_accuracy_or_none(self._val_images, self._val_captions)
            if acc is not None:
                self.log("val/caption_accuracy", acc, prog_bar=True)
        self._val_images, self._val_captions, self._val_codes = [], [], []

    # ---- optimisers -------------------------------------------------------------------------
    def configure_optimizers(self):
        oc = self.optim_cfg
        params = [p for p in self.vqgan.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(params, lr=oc["lr"], betas=tuple(oc["betas"]), weight_decay=oc["weight_decay"])
        sched = {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt_g, self._lr_lambda), "interval": "step"}
        if self.discriminator is None:
            return {"optimizer": opt_g, "lr_scheduler": sched}
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=oc["disc_lr"] or oc["lr"], betas=tuple(oc["betas"]))
        return [opt_g, opt_d], [sched]

    def _lr_lambda(self, step: int) -> float:
        """Linear warmup, then cosine decay to min_lr_ratio at total_steps (constant if total_steps is 0)."""
        oc = self.optim_cfg
        if oc["warmup_steps"] and step < oc["warmup_steps"]:
            return (step + 1) / oc["warmup_steps"]
        if not oc["total_steps"]:
            return 1.0
        t = min(1.0, (step - oc["warmup_steps"]) / max(1, oc["total_steps"] - oc["warmup_steps"]))
        return oc["min_lr_ratio"] + (1 - oc["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t))

    def _schedulers(self) -> list:
        s = self.lr_schedulers()
        return [] if s is None else (s if isinstance(s, list) else [s])

    # ---- checkpoint: keep our own step count ------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vqgan_steps_done"] = self._steps_done

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._steps_done = int(checkpoint.get("vqgan_steps_done", 0))

    @torch.no_grad()
    def load_vq_weights(self, sd: dict[str, torch.Tensor], noise: float = 0.01) -> int:
        """Start from trained VQModel weights (taming keys). A smaller codebook in `sd` is grown to
        this model's n_embed by splitting: new code j copies old code j mod n_old plus `noise` x its
        std of Gaussian noise, so near-ties between copies let each take part of the old cluster.
        Returns the number of codes in `sd`. Any other shape mismatch is an error."""
        sd = dict(sd)
        key = "quantize.embedding.weight"
        old = sd[key].float()
        n_old, n_new = old.shape[0], self.cfg.n_embed
        if old.shape[1] != self.cfg.embed_dim or n_old > n_new:
            raise ValueError(f"codebook [{n_old}, {old.shape[1]}] cannot start a [{n_new}, {self.cfg.embed_dim}] one: "
                             "init_from needs the same embed_dim and at most tokenizer.n_embed codes")
        if n_old < n_new:
            grown = old[torch.arange(n_new) % n_old]
            grown[n_old:] += noise * old.std() * torch.randn_like(grown[n_old:])
            sd[key] = grown
        try:
            self.vqgan.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"init_from weights do not fit tokenizer {self.cfg}: {str(e).splitlines()[0]}") from None
        if self.cb_cfg["ema"]:
            self.ema_embed_sum.copy_(self.vqgan.quantize.embedding.weight)
        return n_old

    def vq_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the VQModel weights, in taming key layout (what `ImageTokenizer` loads)."""
        return {k: v.detach().cpu().clone() for k, v in self.vqgan.state_dict().items()}


_checker_warned = False


def caption_accuracy_or_none(images: list, captions: list[str]) -> float | None:
    """Caption accuracy of uint8 images [H, W, 3] by the world's checker; None (warned once) if unavailable."""
    global _checker_warned
    try:
        from cm3leon.data.checker import caption_accuracy
    except ImportError as e:
        if not _checker_warned:
            log.warning("val caption accuracy skipped: cm3leon.data.checker not importable (%s)", e)
            _checker_warned = True
        return None
    result = caption_accuracy(images, captions)
    # the checker names its headline "accuracy" (its first brief said "correct")
    return float(result["accuracy"] if "accuracy" in result else result["correct"])
