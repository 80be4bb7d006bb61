"""One error family for everything the user can get wrong; CLIs print it as one line and exit non-zero."""

from __future__ import annotations


class ShelfSightError(Exception):
    """A problem with user input (file, config, model, device) that deserves a one-line message."""


class ManifestError(ShelfSightError):
    """A model manifest or one of its artifacts is missing, malformed or tampered with."""


class ConfigError(ShelfSightError):
    """A YAML/JSON configuration file does not match its schema."""
