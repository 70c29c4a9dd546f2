"""Errors with messages meant for the person running the program.

Every user-facing failure (bad audio, bad config, broken model folder) raises one of these, so the
CLI and the server can print one clear line instead of a traceback.
"""


class StepAudioError(Exception):
    """Base class: the message is the whole story, printed as is."""


class ConfigError(StepAudioError):
    pass


class AudioError(StepAudioError):
    pass


class ModelError(StepAudioError):
    pass
