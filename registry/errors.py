"""Errors shared by every mose component.

Every error a user can cause derives from :class:`MoseError`; the CLI prints its message
(no traceback) and exits with status 2, and the HTTP layer maps it to a 4xx response.
"""


class MoseError(Exception):
    """A user-facing error: the message says what was wrong and how to fix it."""


class ManifestError(MoseError):
    """The expert manifest is malformed or violates a rule."""


class ArtifactError(MoseError):
    """An expert's files are missing, unsafe, or do not match their recorded digests."""


class SignatureError(MoseError):
    """A signature is missing, malformed, untrusted or does not verify."""


class NotFoundError(MoseError):
    """The named expert (or object) does not exist."""


class ConflictError(MoseError):
    """The operation conflicts with what is stored (e.g. name@version with other digests)."""


class StatusError(MoseError):
    """The expert is not in a status that allows the operation."""


class AccessDeniedError(MoseError):
    """The caller (a team token) may not make this change, or its token is not valid."""
