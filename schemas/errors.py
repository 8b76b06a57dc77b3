"""Errors raised when a cache does not match the contract."""


class CacheFormatError(ValueError):
    """A cache file is missing, malformed, or written by an unsupported format version.

    The message always names the file and, where there is one, the field.
    """


class CacheMismatchError(ValueError):
    """A writer's settings disagree with the manifest already in the cache folder."""
