"""VQGAN training: the real Hydra script on tiny shards (fast_dev_run + export), its config (the
Makefile's overrides, defaults written once), the data module, and the module's GAN / EMA /
dead-code paths."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cm3leon.data.image_datamodule import ImageShardDataset
from cm3leon.data.raw_shards import write_shard
from cm3leon.data.world import sample_for
from cm3leon.errors import UsageError
from cm3leon.lit.vqgan_module import VQGANModule
from cm3leon.tokenizers import ImageTokenizer, VQGANConfig
from cm3leon.tokenizers.image_tokenizer import resolve_config
from project import CONF_DIR, SRC_DIR

TINY16 = dict(
    ch=8,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    z_channels=8,
    embed_dim=4,
    n_embed=16,
    resolution=16,
    num_groups=4,
)


def _write_world_shards(folder, n, bad_keys=()):
    """n world samples (64 px) in one shard; samples listed in bad_keys get an undecodable png."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        s = sample_for(0, "val", i)
        if i in bad_keys:
            s["png"] = b"not a png"
        samples.append(s)
    write_shard(folder / "000000.tar", samples)
    return folder


def test_dataset_skips_undecodable_samples(tmp_path):
    shards = _write_world_shards(tmp_path / "val", 6, bad_keys=(2,))
    ds = ImageShardDataset(shards, resolution=32, train=False)
    items = list(ds)
    assert len(items) == 5 and ds.skipped == {"bad_image": 1}
    assert items[0]["image"].shape == (3, 32, 32) and items[0]["caption"].startswith("a ")
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    # training stream: endless, resampled
    train = iter(ImageShardDataset(shards, resolution=32, train=True, shuffle_buffer=4))
    assert len([next(train) for _ in range(12)]) == 12


def _compose(overrides: list[str], hydra_config: bool = False):
    """conf/train_tokenizer.yaml composed as the script does (its schemas registered on import)."""
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, str(SRC_DIR))
    import train_tokenizer  # noqa: F401 - registers the schemas

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train_tokenizer", overrides=overrides, return_hydra_config=hydra_config)


def test_config_makefile_overrides_and_defaults_written_once():
    """Every override `make tokenizers` passes composes; the architecture and training defaults come
    from the dataclasses (a named config holds only what differs); tokenizer configs are package data."""
    from cm3leon.config import VQGANTrainingConfig
    from cm3leon.tokenizers.image_tokenizer import CONFIG_DIR

    stages = [
        [
            "hydra.run.dir=/tmp/x",
            "tokenizer.n_embed=512",
            "trainer.max_steps=4000",
            "module.optim.total_steps=6000",
            "ckpt_path=/tmp/x/last.ckpt",
            "export_to=/tmp/x/vq.ckpt",
        ],
        ["init_from=/tmp/vq.ckpt", "module.decoder_only=true", "trainer.max_steps=3000", "module.optim.lr=3e-4"],
    ]
    for overrides in stages:
        cfg = _compose(overrides)
        assert cfg.trainer._target_ == "lightning.pytorch.Trainer" and "model_checkpoint" in cfg.callbacks
        assert {"wandb", "csv"} <= set(cfg.logger)
    assert cfg.module.decoder_only is True and cfg.module.optim.lr == 3e-4
    assert VQGANConfig(**_compose(["tokenizer=paper256"]).tokenizer) == VQGANConfig()  # the paper's: the defaults
    assert _compose(["tokenizer=paper256", "tokenizer.n_embed=16384"]).tokenizer.n_embed == 16384
    tiny = _compose([]).tokenizer
    assert VQGANConfig(**tiny) == resolve_config("tiny") and tiny.resolution == 64
    # the module's defaults are the dataclass's; the yaml changes only the world recipe's keys
    defaults = VQGANTrainingConfig()
    assert _compose([]).module.loss.disc_weight == defaults.loss.disc_weight
    assert not (CONF_DIR / "tokenizer").exists() and (CONFIG_DIR / "tiny.yaml").is_file()


def test_hydra_script_fast_dev_run_and_export(tmp_path):
    """The script's own `train(cfg)` on its real composed config (in process: no interpreter start-up)."""
    from hydra.core.hydra_config import HydraConfig

    from train_tokenizer import train

    train_dir = _write_world_shards(tmp_path / "train", 8, bad_keys=(3,))
    val_dir = _write_world_shards(tmp_path / "val", 4)
    export = tmp_path / "export" / "vq.ckpt"
    overrides = [
        f"paths.output_dir={tmp_path / 'run'}",
        f"data.train_shards={train_dir}",
        f"data.val_shards={val_dir}",
        "data.embedded_world=false",
        "module.val.caption_accuracy=true",  # world captions: the checker scores the reconstructions
        "data.batch_size=4",
        "data.val_batch_size=4",
        "data.shuffle_buffer=4",
        "+trainer.fast_dev_run=true",
        "trainer.enable_progress_bar=false",
        "logger=csv",  # what a user types to leave W&B out (this config's wandb name must not linger)
        f"export_to={export}",
    ]
    cfg = _compose(overrides, hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    summary = train(cfg)
    assert {
        "train/rec_loss",
        "train/q_loss",
        "train/codebook_usage",
        "train/perplexity",
        "train/dead_codes",
        "val/rec_loss",
        "val/caption_accuracy",
    } <= set(summary)
    assert 0.0 <= summary["val/caption_accuracy"] <= 1.0
    # the export holds only VQModel keys and loads strictly with its yaml
    sd = torch.load(export, weights_only=True)["state_dict"]
    assert all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")) for k in sd)
    assert "rebuild:" in export.with_suffix(".yaml").read_text()
    tok = ImageTokenizer.from_checkpoint(export)
    assert tok.resolution == 64 and tok.tokens_per_image == 64 and tok.n_codes == 2048


def _random_loader(n_batches=4, bs=4, res=16):
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(3, res, res, generator=g) * 2 - 1, "caption": ""} for _ in range(n_batches * bs)]
    return DataLoader(data, batch_size=bs)


def test_module_gan_restart_and_ema(tmp_path, ema=True):
    """Two optimizers (GAN after disc_start), EMA codebook and restarts in one short fit (the gradient
    codebook path runs in the fast_dev_run test above)."""
    module = VQGANModule(
        tokenizer=TINY16,
        optim={"lr": 1e-3, "total_steps": 4},
        loss={"disc_enabled": True, "disc_start": 2, "disc_ndf": 8, "disc_layers": 2},
        codebook={"window": 2, "restart_every": 2, "restart_until": None, "ema": ema},
    )
    before = module.vqgan.quantize.embedding.weight.detach().clone()
    disc_before = module.loss.discriminator.main[0].weight.detach().clone()
    trainer = L.Trainer(
        max_steps=8,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=_random_loader())
    # 2 batches before disc_start (1 optimizer step each) + 3 after (2 each) = Lightning's 8 steps
    assert module._steps_done == 5 and trainer.global_step == 8
    after = module.vqgan.quantize.embedding.weight.detach()
    assert not torch.equal(before, after)  # codebook moved (gradient or EMA, and restarts)
    assert not torch.equal(disc_before, module.loss.discriminator.main[0].weight)  # the GAN trained after disc_start
    stats = module.codebook_stats()
    assert 0 < stats["train/codebook_usage"] <= 1 and stats["train/perplexity"] >= 1
    assert module.vqgan.quantize.embedding.weight.requires_grad is (not ema)


def test_dead_codes_restart_onto_encoder_outputs():
    module = VQGANModule(tokenizer=TINY16, codebook={"window": 3, "restart_every": 3, "restart_until": None})
    n = TINY16["n_embed"]
    for _ in range(3):  # only codes 0 and 1 used in the window
        module._track_codes(torch.tensor([[0, 1]]), torch.randn(1, 4, 1, 2) + 100.0)
    module._maybe_restart_codes(step=2)
    w = module.vqgan.quantize.embedding.weight.detach()
    assert w[2:].mean() > 50  # dead codes moved onto (shifted) recent encoder outputs
    assert w[:2].abs().max() < 1  # used codes untouched
    assert len(module._counts) == 0 and n == w.shape[0]


def test_perceptual_loss_without_weights_is_one_clear_error():
    with pytest.raises(FileNotFoundError, match="perceptual_vgg_path"):
        VQGANModule(tokenizer=TINY16, loss={"perceptual_weight": 1.0, "perceptual_vgg_path": "/no/vgg16.pth"})


def test_perceptual_loss_with_local_vgg(tmp_path):
    import torchvision

    path = tmp_path / "vgg16.pth"
    feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # = vgg16().features
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)
    module = VQGANModule(
        tokenizer={**TINY16, "resolution": 32}, loss={"perceptual_weight": 1.0, "perceptual_vgg_path": str(path)}
    )
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d_same = module.loss.perceptual(x, x)
    d_diff = module.loss.perceptual(x, -x)
    assert d_same.shape == (2,) and torch.allclose(d_same, torch.zeros(2), atol=1e-6)
    assert (d_diff > 0).all()
    assert not any(p.requires_grad for p in module.loss.perceptual.parameters())


def test_init_from_grows_the_codebook_by_splitting_codes(tmp_path):
    """init_from: trained weights start a run; a 16-code codebook grows to 64 by noisy copies, and
    the grown model tokenizes like the old one (the old codes are its first rows, the copies lie
    within noise of them)."""
    small = VQGANModule(tokenizer=TINY16)
    with torch.no_grad():
        small.vqgan.quantize.embedding.weight.normal_()
    big = VQGANModule(tokenizer={**TINY16, "n_embed": 64})
    assert big.load_vq_weights(small.vq_state_dict()) == 16
    old, new = small.vqgan.quantize.embedding.weight, big.vqgan.quantize.embedding.weight
    assert torch.equal(new[:16], old)
    gap = (new[16:] - old.repeat(3, 1)).norm(dim=1)
    assert (gap > 0).all() and (gap < 0.1 * old.norm(dim=1).repeat(3)).all()
    assert torch.equal(big.vqgan.encoder.conv_in.weight, small.vqgan.encoder.conv_in.weight)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    same = (big.vqgan.encode(x)[2] % 16 == small.vqgan.encode(x)[2]).float().mean()
    assert same > 0.9  # a copy may win a near-tie, and then it is the split of the same code
    # what cannot start the run is one clear error
    with pytest.raises(ValueError, match="embed_dim"):
        VQGANModule(tokenizer={**TINY16, "n_embed": 8}).load_vq_weights(small.vq_state_dict())
    with pytest.raises(ValueError, match="do not fit"):
        VQGANModule(tokenizer={**TINY16, "ch": 16}).load_vq_weights(small.vq_state_dict())


def test_decoder_only_training_keeps_every_code(tmp_path):
    """decoder_only: the decoder learns while the encoder, quant_conv and codebook stay bit-identical
    (restarts are off), so images tokenize exactly as before and existing token shards stay valid."""
    module = VQGANModule(
        tokenizer=TINY16,
        optim={"lr": 1e-2, "total_steps": 4},
        codebook={"window": 1, "restart_every": 1, "restart_until": None},
        decoder_only=True,
    )
    frozen = {
        k: v.clone() for k, v in module.vq_state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))
    }
    decoder_before = module.vqgan.decoder.conv_out.weight.detach().clone()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    codes_before = module.vqgan.encode(x)[2]
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=_random_loader())
    after = module.vq_state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert not torch.equal(decoder_before, module.vqgan.decoder.conv_out.weight)
    assert torch.equal(codes_before, module.vqgan.encode(x)[2])
    with pytest.raises(ValueError, match="ema"):
        VQGANModule(tokenizer=TINY16, codebook={"ema": True}, decoder_only=True)


def test_init_from_a_missing_file_is_one_clear_error(tmp_path):
    """Checked before anything is generated or trained."""
    cfg = _compose([f"init_from={tmp_path / 'nope.ckpt'}", f"paths.output_dir={tmp_path / 'run'}"])
    from train_tokenizer import train

    with pytest.raises(FileNotFoundError, match=r"init_from=.*nope\.ckpt"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_checkpoints_from_before_the_loss_module_still_load():
    """Checkpoints written when the discriminator was `module.discriminator` (now `module.loss.discriminator`)."""
    kw = dict(tokenizer=TINY16, loss={"disc_enabled": True, "disc_ndf": 8, "disc_layers": 2})
    old = VQGANModule(**kw)
    checkpoint = {"state_dict": {k.removeprefix("loss."): v for k, v in old.state_dict().items()}}
    assert any(k.startswith("discriminator.") for k in checkpoint["state_dict"])
    new = VQGANModule(**kw)
    new.on_load_checkpoint(checkpoint)
    new.load_state_dict(checkpoint["state_dict"], strict=True)
    assert torch.equal(new.loss.discriminator.main[0].weight, old.loss.discriminator.main[0].weight)


# ---- fail fast (issue 14 item 8): one line before anything is built ---------------------------
def _write_real_shards(folder, n=4):
    """n samples with captions that are not the world's (a user's own data)."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = [{**sample_for(0, "val", i), "txt": f"a photo of dog number {i}"} for i in range(n)]
    write_shard(folder / "000000.tar", samples)
    return folder


def test_world_caption_checker_on_real_captions_stops_before_fit(tmp_path):
    from train_tokenizer import train

    real = _write_real_shards(tmp_path / "real")
    cfg = _compose(
        [
            f"paths.output_dir={tmp_path / 'run'}",
            f"data.train_shards={real}",
            f"data.val_shards={real}",
            "data.embedded_world=false",
            "module.val.caption_accuracy=true",
            "logger=csv",
        ]
    )
    with pytest.raises(UsageError, match=r"module.val.caption_accuracy=true .*'a photo of dog.*=false"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # stopped before the trainer and its loggers


def _instantiate(node):
    """hydra.utils.instantiate, with the error unwrapped as the scripts' hydra_entry does."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as e:
        raise e.__cause__ from None


def test_own_shards_left_with_embedded_world_stop_untouched(tmp_path):
    """data.embedded_world=true (the default) with the user's train_shards would generate the world
    beside (and over) their shards: refused when the DataModule is made."""
    mine = _write_real_shards(tmp_path / "mine" / "train")
    before = (mine / "000000.tar").read_bytes()
    cfg = _compose([f"data.train_shards={mine}", f"data.val_shards={tmp_path / 'mine' / 'val'}"])
    with pytest.raises(
        UsageError, match=r"data.train_shards=.* is not the embedded world's folder.*embedded_world=false"
    ):
        _instantiate(cfg.data).prepare_data()
    assert (mine / "000000.tar").read_bytes() == before and not (tmp_path / "mine" / "manifest.json").exists()


def test_missing_own_shards_are_one_line(tmp_path):
    cfg = _compose(["data.embedded_world=false", f"data.train_shards={tmp_path / 'none'}"])
    with pytest.raises(UsageError, match=r"data.train_shards=.*none"):
        _instantiate(cfg.data)
