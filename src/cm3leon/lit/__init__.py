"""LightningModules (and their callbacks): the CM3Leon language model and the VQGAN image tokenizer."""
