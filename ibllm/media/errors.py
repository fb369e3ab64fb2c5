"""The one error type every media loader raises."""


class MediaError(ValueError):
    """An uploaded file could not be used. The message is meant for a person: what was wrong, what is accepted."""
