"""Errors the user can act on. Their message is one line that names the problem.

The CLI prints ``duplex: error: <message>`` and exits non-zero; services report them as error
events and keep running. Anything else is a bug and keeps its traceback.
"""


class DuplexError(Exception):
    """Base of every user-facing error."""


class AudioInputError(DuplexError):
    """A file or stream that cannot be read or decoded as audio."""


class DeviceError(DuplexError):
    """An audio device that does not exist, cannot be opened, or PortAudio missing."""


class ConfigError(DuplexError):
    """An invalid configuration value, key or file."""
