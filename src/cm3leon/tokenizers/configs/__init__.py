"""Package data: the named VQGAN architectures (`tokenizer/*.yaml`), read by
`cm3leon.tokenizers.image_tokenizer.resolve_config` and, as the Hydra search path
`pkg://cm3leon.tokenizers.configs`, the `tokenizer` config group of conf/train_tokenizer.yaml.
(Hydra reads a `pkg://` search path only from a package with an `__init__.py`.)"""
