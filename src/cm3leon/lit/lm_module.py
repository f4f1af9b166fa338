"""The LightningModule of the main job: the CM3Leon decoder trained with the CM3 objective.

Loss (PAPER.md section 3): plain next-token cross-entropy over every target the DataModule left
in (all non-pad tokens, retrieved documents included; targets = -100 carry no loss). Validation
splits the loss by the kind of target token: text, image, and structure (<break>, sentinels,
<eoss>).

Optimizer (PAPER.md section 2, [C]): AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on every
matrix (token embeddings and position embeddings included, as in metaseq which decays all
parameters); parameters with fewer than 2 dimensions (biases, affine norm weights; none with the
paper's architecture) are exempt. LR: linear warmup to the peak, then linear decay to
`final_lr_ratio` x peak (0.1) at `max_steps`.
"""

from __future__ import annotations

import contextlib

import lightning as L
import torch
from torchmetrics import Metric, SumMetric

from cm3leon.data.sequences import IGNORE_INDEX
from cm3leon.errors import UsageError
from cm3leon.model import CM3LeonLM, ModelConfig
from cm3leon.safe_load import to_plain
from cm3leon.vocab import Vocab


def warmup_linear_decay(step: int, warmup: int, total: int, final_ratio: float) -> float:
    """LR multiplier: 0 -> 1 over `warmup` steps, then linearly to `final_ratio` at `total`, flat after."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return 1.0 - (1.0 - final_ratio) * progress


class TokenCounts(Metric):
    """Counts of every token id seen (summed across processes): a [V] float vector."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.add_state("counts", torch.zeros(vocab_size), dist_reduce_fx="sum")

    def update(self, ids: torch.Tensor) -> None:
        self.counts += torch.bincount(ids.flatten(), minlength=self.counts.numel()).float()

    def compute(self) -> torch.Tensor:
        return self.counts


class CM3LeonLitModule(L.LightningModule):
    """Args:
    model: ModelConfig fields (conf/model/*.yaml; its `recipe` is ignored); vocab_size is taken
        from `vocab`.
    vocab: `Vocab.to_dict()` of the training data. None (training from `conf/train.yaml`): taken
        from the trainer's DataModule once it has prepared its data, when Lightning calls
        `configure_model`; it is then saved in the hyperparameters with `data_meta`, so that
        `load_from_checkpoint` builds the model at once.
    optim: {lr, betas, eps, weight_decay, warmup_steps, final_lr_ratio} (conf/optim).
    compile: torch.compile each transformer block (in place).
    data_meta: the token shards' meta.json (tokenizer paths and hashes, tokens per image) and the
        retrieval settings, kept in the checkpoint so that generation and evaluation find the
        matching tokenizers and memory bank (default: the DataModule's `data_meta()`).
    init_from: a checkpoint whose weights the model starts from when `configure_model` builds it
        (`ckpt_init`, `cm3leon.lit.init_from`); recorded in the hyperparameters when given.
    """

    def __init__(
        self,
        model: dict,
        vocab: dict | None = None,
        optim: dict | None = None,
        compile: bool = False,
        data_meta: dict | None = None,
        init_from: str | None = None,
    ):
        super().__init__()
        # plain dicts and lists only (OmegaConf nodes become dicts): the checkpoint then loads with
        # torch.load(weights_only=True), which the inference loader and resume insist on
        hparams = dict(model=model, vocab=vocab, optim=optim, compile=compile, data_meta=data_meta)
        if init_from:
            hparams["init_from"] = str(init_from)
        self.save_hyperparameters(to_plain(hparams, "hyperparameters"))
        self.init_from = init_from
        self.optim = dict(self.hparams.optim or {})
        self.vocab: Vocab | None = None
        self.model: CM3LeonLM | None = None
        self.flops_per_batch = 0  # read by lightning's ThroughputMonitor (MFU)
        if vocab is not None:
            self._build(Vocab.from_dict(self.hparams.vocab))

    def configure_model(self) -> None:
        """Build the model from the DataModule's vocabulary (after its prepare_data and setup)."""
        if self.model is not None:
            return
        dm = self.trainer.datamodule
        if dm is None:
            raise UsageError(
                "CM3LeonLitModule without vocab= needs a CM3DataModule: trainer.fit(module, datamodule=dm)"
            )
        vocab = dm.load_meta()
        meta = self.hparams.get("data_meta") or to_plain(dm.data_meta(), "data_meta")
        self.hparams.update(vocab=vocab.to_dict(), data_meta=meta)
        self._build(vocab)
        if self.init_from:
            from cm3leon.lit.init_from import load_init_weights

            load_init_weights(self, self.init_from)

    def _build(self, vocab: Vocab) -> None:
        from cm3leon.lit.fsdp2 import is_fsdp2, shard_model

        self.vocab = vocab
        self.config = ModelConfig.from_dict(dict(self.hparams.model), vocab_size=vocab.size)
        trainer = self._trainer  # None outside fit (e.g. load_from_checkpoint)
        fsdp2 = trainer is not None and is_fsdp2(trainer.strategy)
        with torch.device("meta") if fsdp2 else contextlib.nullcontext():
            self.model = CM3LeonLM(self.config)
        if self.hparams.compile:
            # each block compiled in place (as FSDP wraps them); embeddings, head and loss stay eager
            for block in self.model.blocks:
                block.compile()
        if fsdp2:  # trainer=fsdp2: one FSDP2 unit per block, allocated and initialised sharded
            shard_model(self.model, trainer.strategy.root_device, trainer.world_size, trainer.precision)
        # validation loss sums per target kind: all / text / image / structure
        self.val_sums = torch.nn.ModuleDict({k: SumMetric() for k in ("all", "text", "image", "struct")})
        self.val_counts = torch.nn.ModuleDict({k: SumMetric() for k in ("all", "text", "image", "struct")})
        # counts of every validation target id: the unigram baseline's loss is their entropy
        self.val_unigram = TokenCounts(vocab.size)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]; packed rows (data.packing) pass their positions and
        doc_ids [B, T] (document-aware attention, `CM3LeonLM.forward`)."""
        return self.model(input_ids, positions, doc_ids=doc_ids)

    def _losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the target losses, with gradients; per-target fp32 losses [B, T], 0 where the
        target is -100). The head and the loss run chunked: no [B, T, V] logits (cm3leon/loss.py)."""
        return self.model(
            batch["input_ids"], batch.get("positions"), doc_ids=batch.get("doc_ids"), targets=batch["targets"]
        )

    def _token_losses(self, batch: dict) -> torch.Tensor:
        """Per-target cross-entropy [B, T] (0 where target is -100), computed in fp32."""
        return self._losses(batch)[1]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        total, _ = self._losses(batch)
        # the DataModule counted the real targets on the CPU: dividing by them needs no device sync
        if "n_real" in batch:
            loss = total / max(int(batch["n_real"]), 1)
        else:
            loss = total / (batch["targets"] != IGNORE_INDEX).sum().clamp(min=1)
        B, T = batch["input_ids"].shape
        # MFU counts real tokens only (targets that carry loss; counted on the CPU by the DataModule)
        self.flops_per_batch = self.model.flops_per_token(T) * int(batch.get("n_real", B * T))
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        return loss

    def on_validation_epoch_start(self) -> None:
        # per-source loss sums and counts [S, 2] when the DataModule names its sources (SFT mixtures)
        dm = self.trainer.datamodule if self._trainer is not None else None
        self.val_source_names = tuple(getattr(dm, "source_names", ()) or ())
        self.val_source_sums = torch.zeros(len(self.val_source_names), 2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses = self._token_losses(batch)
        targets = batch["targets"]
        valid = targets != IGNORE_INDEX
        if batch.get("sources") is not None and self.val_source_names:  # unpacked rows: one source each
            rows = torch.tensor([self.val_source_names.index(s) for s in batch["sources"]], device=losses.device)
            per_row = torch.stack([(losses * valid).sum(1), valid.sum(1)], 1).double()
            self.val_source_sums.index_add_(0, rows, per_row)
        kinds = {
            "all": valid,
            "text": valid & self.vocab.is_text(targets),
            "image": valid & self.vocab.is_image(targets),
        }
        kinds["struct"] = valid & ~kinds["text"] & ~kinds["image"]
        for k, m in kinds.items():
            self.val_sums[k].update(losses[m].sum())
            self.val_counts[k].update(m.sum())
        self.val_unigram.update(targets[valid])

    def on_validation_epoch_end(self) -> None:
        for k in self.val_sums:
            total, count = self.val_sums[k].compute(), self.val_counts[k].compute()
            self.val_sums[k].reset()
            self.val_counts[k].reset()
            if count > 0:
                loss = total / count
                name = "val/loss" if k == "all" else f"val/loss_{k}"
                self.log(name, loss, prog_bar=k == "all", sync_dist=False)
                if k in ("all", "text", "image"):
                    self.log(name.replace("loss", "ppl"), torch.exp(loss.clamp(max=30)))
        if self.val_source_names:  # every rank holds an [S, 2] of the same S, so each rank calls the reduce once
            sums = self.trainer.strategy.reduce(self.val_source_sums, reduce_op="sum")
            for name, (total, count) in zip(self.val_source_names, sums.tolist()):
                if count > 0:
                    self.log(f"val/loss_source/{name}", total / count, sync_dist=False)
        counts = self.val_unigram.compute()
        self.val_unigram.reset()
        if counts.sum() > 0:
            p = counts[counts > 0] / counts.sum()
            # the best unigram model's loss on these targets: the bar the model must clear
            self.log("val/unigram_loss", -(p * p.log()).sum())

    def configure_optimizers(self):
        o = self.optim
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": o["weight_decay"]}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        fused = torch.cuda.is_available() and self.device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], fused=fused or None)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else o["warmup_steps"]
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_linear_decay(s, o["warmup_steps"], total, o["final_lr_ratio"])
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
