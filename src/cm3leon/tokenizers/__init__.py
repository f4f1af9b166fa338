"""Tokenizers: the VQGAN image tokenizer (taming-compatible weights) and image pre/post-processing."""

from cm3leon.tokenizers.image_tokenizer import ImageTokenizer
from cm3leon.tokenizers.vqgan import VQGANConfig, VQModel

__all__ = ["ImageTokenizer", "VQGANConfig", "VQModel"]
