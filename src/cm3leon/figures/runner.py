"""The runs a figure is made of: trainings (`src/train.py`), zero-shot evaluations
(`src/eval_fid.py eval=embedded`) and image likelihoods (`cm3leon.eval.image_nll`), each resumable.

    ctx = FigureContext(cfg)                              # the composed conf/figures.yaml
    ckpt = ctx.train("retrieval")                         # conf models.retrieval at train.steps
    res = ctx.evaluate(ckpt, "retrieval_k2", ["retrieval.k=2"])   # fid.json + per-caption correct
    nll = ctx.image_nll(ckpt, "retrieval", k=2)           # [n_captions] nats per image token

Trainings and evaluations run as the real scripts in subprocesses, each in its own folder under
`work_dir`: a training resumes from its `last.ckpt` (`ckpt_path=last`) and is skipped when its final
checkpoint exists; an evaluation keeps the images already on disk (eval_fid's own resume) and is
skipped when its `fid.json` exists for the same arguments (`figure_args.json`). Interrupt
`python src/figures.py` anywhere and run it again: it continues.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cm3leon.errors import UsageError
from cm3leon.utils import child_env, write_json_atomic


def _plain(node) -> list | dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


class FigureContext:
    """What every figure needs: where runs go, how to train and evaluate (see the module docstring)."""

    def __init__(self, cfg: DictConfig, python: str | None = None):
        self.cfg = cfg
        self.root = Path(str(cfg.paths.root_dir))
        self.work_dir = Path(str(cfg.work_dir))
        self.out_dir = Path(str(cfg.out_dir))
        self.python = python or sys.executable
        self.log = print

    # ---- subprocesses -------------------------------------------------------------------------
    def _run(self, script: str, args: list[str], log_file: Path) -> None:
        """Run `src/<script>` with Hydra overrides; its output goes to the console and `log_file`."""
        cmd = [self.python, str(self.root / "src" / script), *args]
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log(f"[figures] {' '.join(cmd[1:])}  (log: {log_file})")
        with open(log_file, "a") as log:
            proc = subprocess.Popen(
                cmd, cwd=self.root, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for line in proc.stdout:
                log.write(line)
                if not self.cfg.quiet:
                    sys.stdout.write(line)
            code = proc.wait()
        if code != 0:
            raise UsageError(f"{script} failed (exit {code}): see {log_file}; rerun `python src/figures.py` to resume")

    def shipped_ckpt(self) -> Path:
        """The shipped world model (weights only), which the decoding figures sample."""
        path = Path(str(self.cfg.shipped_ckpt))
        if not path.is_file():
            raise UsageError(f"shipped world model {path} not found: `make world-model` trains it (README, Claims)")
        return path

    # ---- trainings ----------------------------------------------------------------------------
    def precision(self) -> str:
        """The trainings' Lightning precision (`precision: auto`: native bf16 or CUDA, else fp32)."""
        if self.cfg.precision != "auto":
            return str(self.cfg.precision)
        import torch

        from cm3leon.utils import cpu_training_precision

        return "bf16-mixed" if torch.cuda.is_available() else cpu_training_precision()

    def train_dir(self, model: str) -> Path:
        return self.work_dir / "train" / model

    def train(self, model: str) -> Path:
        """The final checkpoint of figure model `model` (conf `models.<model>`), training (or resuming)
        it to `train.steps` when it is not there yet."""
        if model not in self.cfg.models:
            raise UsageError(f"figure model {model!r} is not in models ({', '.join(self.cfg.models)})")
        steps = int(self.cfg.train.steps)
        run = self.train_dir(model)
        final = run / "checkpoints" / f"step_{steps:07d}.ckpt"
        if final.is_file():
            return final
        args = [
            *map(str, _plain(self.cfg.train.overrides)),
            *map(str, _plain(self.cfg.models[model])),
            f"trainer.max_steps={steps}",
            f"trainer.precision={self.precision()}",
            f"seed={int(self.cfg.train.seed)}",
            f"hydra.run.dir={run}",
            "ckpt_path=last",
        ]
        self._run("train.py", args, run / "figures_train.log")
        if not final.is_file():
            raise UsageError(
                f"{final} missing after training: checkpoints must be saved every k steps dividing {steps}"
            )
        return final

    # ---- evaluations --------------------------------------------------------------------------
    def eval_args(self, samples: int = 1) -> list[str]:
        """The evaluation protocol every figure shares (conf `eval` and `eval_seed`); `samples` per
        caption (more than one: the best by CLIP score is scored)."""
        e = self.cfg.eval
        return [
            "eval=embedded",
            f"eval.samples_per_caption={int(samples)}",
            f"eval.rerank.enabled={str(samples > 1).lower()}",
            f"eval.n_captions={int(e.n_captions)}",
            f"eval.world_seed={int(e.world_seed)}",
            f"eval.split={e.split}",
            f"eval.start={int(e.start)}",
            f"seed={int(self.cfg.eval_seed)}",
            "progress=false",
        ]

    def evaluate(self, ckpt: Path, name: str, overrides: list[str], samples: int = 1) -> dict:
        """`src/eval_fid.py` of `ckpt` with the shared protocol plus `overrides` into
        `<work_dir>/eval/<name>` -> its fid.json (skipped when done with the same arguments)."""
        out = self.work_dir / "eval" / name
        args = [f"ckpt={ckpt}", *self.eval_args(samples), *overrides, f"out_dir={out}"]
        record = {"args": args}
        done = out / "fid.json"
        stamp = out / "figure_args.json"
        if done.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == record:
            return json.loads(done.read_text())
        self._run("eval_fid.py", args, out.parent / f"{name}.log")
        write_json_atomic(stamp, record)
        return json.loads(done.read_text())

    def correct(self, name: str) -> np.ndarray:
        """Per-caption pixel-checker outcome [n] of evaluation `name` (prompt order)."""
        from cm3leon.eval.paired import read_correct

        return np.asarray(read_correct(self.work_dir / "eval" / name)[1], dtype=bool)

    def eval_dir(self, name: str) -> Path:
        return self.work_dir / "eval" / name

    # ---- likelihoods --------------------------------------------------------------------------
    def retrieval_dir(self) -> Path:
        """The world's memory bank (made by the DataModule of a `retrieval=ra` training)."""
        return Path(str(self.cfg.retrieval_dir))

    def image_nll(self, ckpt: Path, model: str, k: int = 0) -> np.ndarray:
        """Mean NLL per image token [n_captions] of the val references given their captions and `k`
        retrieved documents (cached in `<work_dir>/nll/<model>_k<k>.npy`, keyed by checkpoint)."""
        from cm3leon.utils import file_stamp

        path = self.work_dir / "nll" / f"{model}_k{k}.npy"
        stamp = path.with_suffix(".json")
        e = self.cfg.eval
        record = {
            "ckpt": str(ckpt),
            "ckpt_stamp": file_stamp(ckpt),
            "k": k,
            "captions": [int(e.n_captions), int(e.world_seed), str(e.split), int(e.start)],
        }
        if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == record:
            return np.load(path)
        import torch

        from cm3leon.eval.image_nll import image_nll
        from cm3leon.generation.pipeline import load_pipeline

        retrieval = {"k": k, "dir": str(self.retrieval_dir()) if k else None}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = load_pipeline(ckpt, device=device, precision="fp32", retrieval=retrieval)
        captions = [p.caption for p in self.prompts()]
        codes = pipe.image_tokenizer.encode(list(self.references()))
        self.log(f"[figures] image NLL of {model} with {k} retrieved documents on {len(captions)} val pairs")
        nll = image_nll(pipe, captions, codes)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, nll)
        write_json_atomic(stamp, record)
        return nll

    # ---- features (the tiny CLIP space of eval=embedded) ---------------------------------------
    def _space(self):
        if getattr(self, "_clip_space", None) is None:
            from cm3leon.eval.frechet import ClipImageSpace

            node = self.cfg.eval.feature_clip
            self._clip_space = ClipImageSpace(str(node.model_name), str(node.pretrained))
        return self._clip_space

    def features(self, images, what: str = "generated images") -> np.ndarray:
        """Tiny-CLIP features [N, D] of image files (or uint8 arrays), after eval=embedded's resize
        protocol; cached by content hash in `cache_dir` like the evaluation's own."""
        from cm3leon.eval.fid import FeatureCache, ImageSet, ResizeProtocol, features_of

        resize = ResizeProtocol.from_dict(_plain(self.cfg.eval.resize))
        cache = FeatureCache(str(self.cfg.cache_dir))
        return features_of(ImageSet(images, resize, what=what), self._space(), resize, cache)[0]

    def eval_features(self, name: str) -> np.ndarray:
        """Features of evaluation `name`'s images [n_captions, D], in prompt order."""
        from cm3leon.eval.prompts import image_path

        return self.features([image_path(self.eval_dir(name) / "images", p.index) for p in self.prompts()])

    def reference_features(self) -> np.ndarray:
        """Features of the val references [n, D] (the rendered scenes of the captions)."""
        return self.features(list(self.references()), what="reference images")

    def prompts(self):
        """The val captions every figure evaluates (eval=embedded's n_captions, world seed, split, start)."""
        from cm3leon.eval.prompts import world_prompts

        e = self.cfg.eval
        return world_prompts(int(e.n_captions), int(e.world_seed), str(e.split), int(e.start))

    def references(self) -> np.ndarray:
        """The rendered scenes of `prompts()`: uint8 [n, R, R, 3]."""
        from cm3leon.eval.prompts import world_references

        e = self.cfg.eval
        return world_references(int(e.n_captions), int(e.world_seed), str(e.split), int(e.start), int(e.resolution))
