"""LightningModule that trains the VQGAN image tokenizer (taming recipe, sized down for CPU).

LlamaGen's split: the model is `cm3leon.tokenizers.vqgan`, its losses (reconstruction, LPIPS-like
perceptual, PatchGAN with the adaptive weight) `cm3leon.tokenizers.vqgan_loss`, and this file the
training loop. Optimisation is manual (one optimizer, or two with the GAN). Codebook health is
logged over the last `codebook.window` batches (usage fraction, perplexity, dead codes); dead codes
are restarted from random recent encoder outputs every `codebook.restart_every` steps, or the
codebook is trained by EMA (`codebook.ema`).

Every training default is written once, in the dataclasses of `cm3leon.config` (and `VQGANConfig`,
`VQGANLossConfig`); `cm3leon.config.register_configs` hands them to Hydra as the schemas
conf/train_tokenizer.yaml builds on, so that file holds only the embedded world's recipe.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from cm3leon.config import CodebookConfig, CropConfig, OptimConfig, ValConfig
from cm3leon.data.checker import caption_accuracy
from cm3leon.lit.checks import check_caption_checker
from cm3leon.tokenizers.image_processing import postprocess
from cm3leon.tokenizers.vqgan import VQGANConfig, VQModel
from cm3leon.tokenizers.vqgan_loss import VQGANLoss, VQGANLossConfig


def _config(cls, value):
    """A dataclass from a dict of some of its fields (None: all defaults), or the dataclass itself."""
    return value if isinstance(value, cls) else cls(**(value or {}))


class VQGANModule(L.LightningModule):
    """Trains `VQModel` (attribute `vqgan`, so checkpoint keys are `vqgan.<taming key>`).

    Args are dicts of some fields of (or instances of) the dataclasses above, as Hydra composes
    them: tokenizer (`VQGANConfig`), optim, loss (`VQGANLossConfig`), codebook, val, crop,
    decoder_only. The hyperparameters saved in checkpoints are these plain dicts.
    """

    def __init__(
        self,
        tokenizer: dict[str, Any] | VQGANConfig,
        optim: dict[str, Any] | None = None,
        loss: dict[str, Any] | None = None,
        codebook: dict[str, Any] | None = None,
        val: dict[str, Any] | None = None,
        crop: dict[str, Any] | None = None,
        decoder_only: bool = False,
    ):
        super().__init__()
        if isinstance(tokenizer, VQGANConfig):
            tokenizer = tokenizer.to_dict()  # hyperparameters stay plain data
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.cfg = VQGANConfig.from_dict(dict(tokenizer))
        self.optim_cfg = _config(OptimConfig, optim)
        self.codebook_cfg = _config(CodebookConfig, codebook)
        self.val_cfg = _config(ValConfig, val)
        self.crop_cfg = _config(CropConfig, crop)
        self.decoder_only = bool(decoder_only)

        self.vqgan = VQModel(self.cfg)
        self.loss = VQGANLoss(_config(VQGANLossConfig, loss), self.cfg.out_ch)
        if self.decoder_only:
            if self.codebook_cfg.ema:
                raise ValueError("decoder_only keeps the codebook fixed: it cannot be combined with codebook.ema")
            # the encoder, quant_conv and codebook define the codes: frozen, existing token shards stay valid
            for m in (self.vqgan.encoder, self.vqgan.quant_conv, self.vqgan.quantize):
                m.requires_grad_(False)
        if self.codebook_cfg.ema:
            n = self.cfg.n_embed
            self.vqgan.quantize.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.zeros(n))
            self.register_buffer("ema_embed_sum", self.vqgan.quantize.embedding.weight.detach().clone())
        # Codebook statistics over recent batches (not checkpointed: they refill in `window` steps).
        self._counts: deque[torch.Tensor] = deque(maxlen=int(self.codebook_cfg.window))
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
        if not self.codebook_cfg.ema:
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
        decay, n = self.codebook_cfg.ema_decay, self.cfg.n_embed
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = codes.reshape(-1)
        counts = torch.bincount(idx, minlength=n).to(flat.dtype)
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, flat)
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + 1e-5) / (total + n * 1e-5) * total  # Laplace smoothing
        self.vqgan.quantize.embedding.weight.copy_(self.ema_embed_sum / size[:, None])

    def _train_view(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Random crops [B, 3, S, S] of x, at offsets on the code grid (multiples of f), early in training."""
        size, until = self.crop_cfg.size, self.crop_cfg.until
        if not size or size >= x.shape[-1] or step >= until * max(1, self.optim_cfg.total_steps):
            return x
        f = self.cfg.downsample_factor
        n_off = (x.shape[-1] - size) // f + 1
        off = torch.randint(n_off, (x.shape[0], 2)) * f
        return torch.stack([im[:, i : i + size, j : j + size] for im, (i, j) in zip(x, off.tolist())])

    # ---- training ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        opts = self.optimizers()
        opt_g, opt_d = opts if isinstance(opts, (list, tuple)) else (opts, None)
        step = self._step_count()
        x = self._train_view(batch["image"], step)

        with torch.set_grad_enabled(not self.decoder_only):
            z = self.vqgan.encode_pre_quant(x)
            z_q, q_loss, codes = self._quantize(z)
        xrec = self.vqgan.decode(z_q)
        loss, logs = self.loss.generator_loss(x, xrec, q_loss, step, self.vqgan.decoder.conv_out.weight)

        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.optim_cfg.grad_clip:
            self.clip_gradients(opt_g, gradient_clip_val=self.optim_cfg.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()

        if self.loss.gan_on(step):
            d_loss = self.loss.discriminator_loss(x, xrec)
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
        self.log("rec", logs["train/rec_loss"], prog_bar=True, on_step=True, logger=False, batch_size=x.shape[0])
        self._steps_done += 1
        return loss.detach()

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
        return {
            "train/codebook_usage": used / self.cfg.n_embed,
            "train/perplexity": perplexity,
            "train/dead_codes": float(self.cfg.n_embed - used),
        }

    @torch.no_grad()
    def _maybe_restart_codes(self, step: int) -> None:
        """Every `restart_every` steps, move codes unused over the window onto random recent encoder outputs."""
        every, until = int(self.codebook_cfg.restart_every or 0), self.codebook_cfg.restart_until
        if self.decoder_only:
            return  # a restarted code could win the nearest-code search: the codes must not change
        if until is not None and until <= 1 and self.optim_cfg.total_steps:
            until = until * self.optim_cfg.total_steps  # a fraction of the run
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
        if self.codebook_cfg.ema:
            self.ema_embed_sum[dead] = pick.to(weight)
            self.ema_cluster_size[dead] = 1.0
        # the restarted codes must not count as dead again before they had a chance to be used
        self._counts.clear()
        if self._trainer is not None:
            self.log("train/restarted_codes", float(dead.numel()), on_step=True, on_epoch=False)

    def setup(self, stage: str) -> None:
        # the world's caption checker on other captions would crash at the first validation: stop now
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        check_caption_checker(self.val_cfg.caption_accuracy, getattr(datamodule, "val_shards", None))

    # ---- validation -------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        xrec, q_loss, codes = self.vqgan(x)
        xrec = xrec.clamp(-1, 1)
        self.log("val/rec_loss", self.loss.rec_loss(x, xrec), on_epoch=True, batch_size=x.shape[0], prog_bar=True)
        self.log("val/q_loss", q_loss, on_epoch=True, batch_size=x.shape[0])
        self._val_codes.append(codes.reshape(-1).cpu())
        if self.val_cfg.caption_accuracy and len(self._val_captions) < self.val_cfg.caption_samples:
            self._val_images.extend(postprocess(xrec))
            self._val_captions.extend(batch["caption"])

    def on_validation_epoch_start(self) -> None:
        self._val_images, self._val_captions, self._val_codes = [], [], []

    def on_validation_epoch_end(self) -> None:
        if self._val_codes:
            used = torch.unique(torch.cat(self._val_codes)).numel()
            self.log("val/codebook_usage", used / self.cfg.n_embed)
        if self._val_captions:
            acc = caption_accuracy(self._val_images, self._val_captions)["correct"]
            self.log("val/caption_accuracy", acc, prog_bar=True)
        self._val_images, self._val_captions, self._val_codes = [], [], []

    # ---- optimisers -------------------------------------------------------------------------
    def configure_optimizers(self):
        oc = self.optim_cfg
        params = [p for p in self.vqgan.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)
        sched = {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt_g, self._lr_lambda), "interval": "step"}
        if self.loss.discriminator is None:
            return {"optimizer": opt_g, "lr_scheduler": sched}
        opt_d = torch.optim.Adam(self.loss.discriminator.parameters(), lr=oc.disc_lr or oc.lr, betas=tuple(oc.betas))
        return [opt_g, opt_d], [sched]

    def _lr_lambda(self, step: int) -> float:
        """Linear warmup, then cosine decay to min_lr_ratio at total_steps (constant if total_steps is 0)."""
        oc = self.optim_cfg
        if oc.warmup_steps and step < oc.warmup_steps:
            return (step + 1) / oc.warmup_steps
        if not oc.total_steps:
            return 1.0
        t = min(1.0, (step - oc.warmup_steps) / max(1, oc.total_steps - oc.warmup_steps))
        return oc.min_lr_ratio + (1 - oc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def _schedulers(self) -> list:
        s = self.lr_schedulers()
        return [] if s is None else (s if isinstance(s, list) else [s])

    # ---- checkpoint: keep our own step count ------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vqgan_steps_done"] = self._steps_done

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._steps_done = int(checkpoint.get("vqgan_steps_done", 0))
        # checkpoints written before the losses moved into `self.loss` stay resumable
        sd = checkpoint.get("state_dict", {})
        for k in [k for k in sd if k.startswith(("perceptual.", "discriminator."))]:
            sd["loss." + k] = sd.pop(k)

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
            raise ValueError(
                f"codebook [{n_old}, {old.shape[1]}] cannot start a [{n_new}, {self.cfg.embed_dim}] one: "
                "init_from needs the same embed_dim and at most tokenizer.n_embed codes"
            )
        if n_old < n_new:
            grown = old[torch.arange(n_new) % n_old]
            grown[n_old:] += noise * old.std() * torch.randn_like(grown[n_old:])
            sd[key] = grown
        try:
            self.vqgan.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"init_from weights do not fit tokenizer {self.cfg}: {str(e).splitlines()[0]}") from None
        if self.codebook_cfg.ema:
            self.ema_embed_sum.copy_(self.vqgan.quantize.embedding.weight)
        return n_old

    def vq_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the VQModel weights, in taming key layout (what `ImageTokenizer` loads)."""
        return {k: v.detach().cpu().clone() for k, v in self.vqgan.state_dict().items()}
