"""The one exception type for bad user input: a config value, a data file or line, a tokenizer, the
launch environment, a checkpoint that must not be loaded. Its message is one line that names what is
wrong and what to do; `python -m pretrain` prints it as `pretrain: <message>` and exits with status 2,
without a traceback (pretrain/__main__.py).

It lives in data/, the lowest package that raises it, because data/ imports nothing from pretrain/;
pretrain.config.ConfigError and the checkpoint refusals derive from it. A ValueError, so callers that
expect one (tests, the command lines of models/hf.py and pretrain/export.py) keep working.
"""


class UserError(ValueError):
    """Bad input; every rank of a distributed run meets it alike (a config, a checkpoint, a tokenizer),
    so rank 0 alone prints it."""

    every_rank = True


class DataError(UserError):
    """Bad input that one rank may meet alone (a line of its share of the data, a hub it cannot reach):
    the rank that meets it prints it."""

    every_rank = False
