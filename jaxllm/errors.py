"""The one base of every error a user can cause (bad config, data, checkpoint, tokenizer, a diverged run).

Each module keeps its own subclass (config.ConfigError, data.sources.DataError, checkpoint.CheckpointError,
data.tokenizer.TokenizerError, train.loop.TrainingError); the CLI catches JaxllmError and prints its one-line
message. It subclasses ValueError, so `except ValueError` keeps catching them.
"""

from __future__ import annotations


class JaxllmError(ValueError):
    """A mistake the user can fix; the message is one line: what, where, how to fix."""
