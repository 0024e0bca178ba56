"""Pre-training: run config, training loop, checkpoints, metrics, distributed set-up.

`python -m pretrain --config configs/tiny_sample.yaml` (or the `pretrain` console script);
`pretrain.train.train(cfg)` and `pretrain.config.load_config(path, overrides)` in Python.
"""
