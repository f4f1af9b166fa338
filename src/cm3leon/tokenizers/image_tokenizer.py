"""`ImageTokenizer`: images <-> VQGAN codes, loading taming-layout weights from any usual container.

    tok = ImageTokenizer.from_checkpoint("data/shipped/world_vqgan.ckpt")
    codes = tok.encode(pil_images)          # LongTensor [B, h*w], values in [0, tok.n_codes)
    images = tok.decode(codes)              # float [B, 3, R, R] in [-1, 1]
    tok.to_pil(codes)                       # list of PIL images

Checkpoints: a Lightning .ckpt (`state_dict`, keys possibly prefixed, e.g. `vqgan.`), a plain torch
.pt/.pth/.ckpt state dict, or .safetensors. Architecture, first match wins: `config=` (a yaml path, a
dict, a `VQGANConfig`, or a name tiny|paper256|chameleon512 of the package's configs, `CONFIG_DIR`),
a yaml beside the checkpoint with the same stem, or the hyperparameters stored in a Lightning
checkpoint. Flat yamls (the package's, holding what differs from `VQGANConfig`'s defaults) and
taming/Chameleon yamls (`model.params.ddconfig`) are both read. `save_vqgan` writes the weights and
the yaml that `from_checkpoint` reads back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cm3leon.tokenizers.image_processing import ImageLike, postprocess_pil, preprocess_batch
from cm3leon.tokenizers.vqgan import VQ_KEY_PREFIXES, VQGANConfig, VQModel

log = logging.getLogger(__name__)

# The named architectures ship with the package; the folder above this one is also a Hydra search
# path (conf/train_tokenizer.yaml), where they form the `tokenizer` config group.
CONFIG_DIR = resources.files("cm3leon.tokenizers") / "configs" / "tokenizer"
ConfigLike = None | str | Path | Mapping[str, Any] | VQGANConfig | DictConfig


def resolve_config(config: ConfigLike) -> VQGANConfig:
    """A config name (tiny|paper256|chameleon512), yaml path, dict/DictConfig or VQGANConfig -> VQGANConfig."""
    if isinstance(config, VQGANConfig):
        return config
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.suffix not in (".yaml", ".yml"):
            named = CONFIG_DIR / f"{config}.yaml"
            if not named.is_file():
                known = sorted(p.name.removesuffix(".yaml") for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml"))
                raise ValueError(f"unknown tokenizer config {config!r}: give a yaml path or one of {known}")
            config = OmegaConf.create(named.read_text(encoding="utf-8"))
        elif not path.is_file():
            raise FileNotFoundError(f"tokenizer config not found: {path}")
        else:
            config = OmegaConf.load(path)
        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return VQGANConfig.from_dict(dict(config))
    raise TypeError(f"cannot read a VQGAN config from {type(config).__name__}")


def _load_container(path: Path) -> dict[str, Any]:
    """Read a .safetensors or torch file into a dict (a state dict or a checkpoint holding one).
    Torch files are read with weights_only=True: one that would run code is refused (UsageError),
    never unpickled."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    from cm3leon.safe_load import load_weights_only

    return load_weights_only(path, "image tokenizer")


def _config_from_hparams(obj: Mapping[str, Any]) -> VQGANConfig | None:
    """The architecture stored in a Lightning checkpoint's hyper_parameters, if any."""
    hp = obj.get("hyper_parameters") or obj.get("hparams")
    if not isinstance(hp, Mapping):
        return None
    hp = OmegaConf.to_container(hp, resolve=True) if isinstance(hp, DictConfig) else dict(hp)
    for key in ("tokenizer", "vqgan", "model_config", "config"):
        if isinstance(hp.get(key), Mapping):
            return VQGANConfig.from_dict(dict(hp[key]))
    if "ddconfig" in hp or "ch" in hp:
        return VQGANConfig.from_dict(hp)
    return None


def extract_vq_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a wrapper prefix (e.g. `vqgan.`, `model.`) and drop non-VQModel keys (loss, discriminator)."""
    anchors = [k[: -len("quantize.embedding.weight")] for k in sd if k.endswith("quantize.embedding.weight")]
    if not anchors:
        raise KeyError("no `quantize.embedding.weight` in the checkpoint: not a taming-layout VQGAN state dict")
    prefix = min(anchors, key=len)
    out, ignored = {}, []
    for k, v in sd.items():
        name = k[len(prefix) :] if k.startswith(prefix) else None
        if name is not None and name.startswith(VQ_KEY_PREFIXES):
            out[name] = v
        else:
            ignored.append(k)
    if ignored:
        log.debug("ignored %d non-VQModel keys (e.g. %s)", len(ignored), ", ".join(ignored[:5]))
    return out


def _vq_state_dict_of(obj: Any) -> dict[str, torch.Tensor]:
    """The VQModel weights inside a loaded file (a checkpoint holding `state_dict`, or a state dict)."""
    return extract_vq_state_dict(obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj)


def read_vq_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The taming-key VQModel weights of a file (.ckpt / .pt / .safetensors), no architecture needed."""
    return _vq_state_dict_of(_load_container(Path(path)))


def save_vqgan(model: VQModel, path: str | Path, note: str = "", overwrite: bool = False) -> Path:
    """Write the VQModel weights ({"state_dict": taming keys}) to `path` and its architecture, in the
    taming/Chameleon yaml layout, beside it (`path` with a .yaml suffix); `note` becomes its header.

    An existing `path` (or its .yaml) is replaced only with `overwrite` (else a one-line UsageError
    before anything is written); each file is written under a temporary name and renamed, so a
    failed export leaves the old files whole. Callers that train first should run the same check
    before training (`path.exists() and not overwrite`)."""
    from cm3leon.errors import UsageError
    from cm3leon.utils import atomic_path

    path = Path(path)
    yaml_path = path.with_suffix(".yaml")
    existing = [p for p in (path, yaml_path) if p.exists()]
    if existing and not overwrite:
        raise UsageError(f"{existing[0]} exists: pass overwrite=true to replace it, or export to another path")
    state = {"state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    header = f"# VQGAN architecture for {path.name} (taming/Chameleon yaml layout).\n"
    header += "".join(f"# {line}\n" for line in note.splitlines())
    yaml_text = OmegaConf.to_yaml(OmegaConf.create(model.cfg.to_taming_yaml_dict()))
    with atomic_path(yaml_path) as tmp:
        tmp.write_text(header + yaml_text)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


class ImageTokenizer:
    """A frozen VQGAN in eval mode with image-level encode/decode. Codes are flattened row-major: [B, h*w]."""

    def __init__(self, model: VQModel, device: str | torch.device = "cpu", batch_size: int = 64):
        self.model = model.eval().requires_grad_(False).to(device)
        self.config: VQGANConfig = model.cfg
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, config: ConfigLike, device: str | torch.device = "cpu") -> "ImageTokenizer":
        """A randomly initialised tokenizer: for tests and benchmarks only, never for results."""
        return cls(VQModel(resolve_config(config)), device)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: ConfigLike = None, device: str | torch.device = "cpu"
    ) -> "ImageTokenizer":
        """Load taming-layout VQGAN weights; keys must match the architecture strictly."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"VQGAN checkpoint not found: {path}")
        obj = _load_container(path)
        if config is None:
            beside = [p for p in (path.with_suffix(".yaml"), path.with_suffix(".yml")) if p.is_file()]
            if beside:
                config = beside[0]
            else:
                config = _config_from_hparams(obj) if isinstance(obj, Mapping) else None
                if config is None:
                    raise ValueError(
                        f"no architecture for {path}: pass config= (yaml path or tiny|paper256|chameleon512) "
                        f"or put {path.with_suffix('.yaml').name} beside it"
                    )
        cfg = resolve_config(config)
        sd = _vq_state_dict_of(obj)
        with torch.device("meta"):  # no random init: every weight comes from the file
            model = VQModel(cfg)
        try:
            model.load_state_dict(sd, strict=True, assign=True)
            model = model.float()  # half-precision files are computed in fp32
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise RuntimeError(
                f"VQGAN weights in {path} do not match the config {cfg}: {' '.join(first[:3])[:600]}"
            ) from None
        return cls(model, device)

    # ---- properties -------------------------------------------------------------------------
    @property
    def n_codes(self) -> int:
        return self.config.n_embed

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def latent_size(self) -> int:
        return self.config.latent_size

    # ---- images <-> codes -------------------------------------------------------------------
    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """PIL images / uint8 arrays -> float [B, 3, R, R] in [-1, 1] (white-blend, LANCZOS, centre crop)."""
        return preprocess_batch(images, self.resolution)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor | Sequence[ImageLike]) -> torch.Tensor:
        """images: float [B, 3, R, R] in [-1, 1], or a list of PIL images / uint8 arrays -> codes [B, h*w] int64."""
        x = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(
                f"encode expects float images [B, 3, {self.resolution}, {self.resolution}] in [-1, 1], got "
                f"{tuple(x.shape)}; pass PIL images or uint8 arrays to get the resize and crop"
            )
        out = []
        for chunk in x.split(self.batch_size):
            z = self.model.encode_pre_quant(chunk.to(self.device, torch.float32))
            out.append(self.model.quantize.codes(z).flatten(1))
        return torch.cat(out).long().cpu()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h*w] (or [B, h, w]) in [0, n_codes) -> images float [B, 3, R, R] in [-1, 1], on CPU."""
        codes = torch.as_tensor(codes)
        if codes.dim() == 3:
            codes = codes.flatten(1)
        if codes.dim() != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"decode expects codes [B, {self.tokens_per_image}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.n_codes):
            raise ValueError(f"codes must lie in [0, {self.n_codes}); got [{int(codes.min())}, {int(codes.max())}]")
        out = []
        for chunk in codes.long().split(self.batch_size):
            out.append(self.model.decode_codes(chunk.to(self.device)).clamp(-1, 1).float().cpu())
        return torch.cat(out)

    def reconstruct(self, images: torch.Tensor | Sequence[ImageLike]) -> torch.Tensor:
        """encode then decode: float [B, 3, R, R] in [-1, 1]."""
        return self.decode(self.encode(images))

    def to_pil(self, x: torch.Tensor) -> list:
        """codes [B, h*w] (integer) or images float [B, 3, H, W] in [-1, 1] -> list of PIL images."""
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = self.decode(x)
        return postprocess_pil(x)
