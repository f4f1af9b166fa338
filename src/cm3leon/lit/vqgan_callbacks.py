"""Callbacks of the VQGAN training (conf/callbacks/tokenizer.yaml)."""

from __future__ import annotations

import time

import lightning as L


class PrintProgress(L.Callback):
    """One plain line every `every` training batches and after each validation (readable in log
    files, unlike a progress bar). Counts `VQGANModule._steps_done`: with the GAN on, Lightning's
    global_step counts both optimizers' steps."""

    KEYS = ("train/rec_loss", "train/q_loss", "train/codebook_usage", "train/perplexity")

    def __init__(self, every: int = 50):
        self.every, self.t0 = every, time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module._steps_done
        if self.every and step % self.every == 0:
            m = trainer.callback_metrics
            vals = " ".join(f"{k.split('/')[-1]}={float(m[k]):.4g}" for k in self.KEYS if k in m)
            print(f"[train_tokenizer] step {step} {time.time() - self.t0:.0f}s {vals}", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        vals = " ".join(f"{k}={float(v):.4g}" for k, v in m.items() if k.startswith("val/"))
        print(f"[train_tokenizer] validation at step {pl_module._steps_done}: {vals}", flush=True)
