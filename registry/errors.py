"""Errors shared by every mose component.

Every error mose explains derives from :class:`MoseError`; the CLI prints its message (no
traceback) and exits with status 2. Over HTTP a client's error is a 4xx; a :class:`ServerError`
(the server's own state is at fault: a stored file changed, an artifact cannot be read) is a 500,
and an :class:`UnavailableError` (something the request needs is not there yet: no router, no
calibrator) a 503.
"""


class MoseError(Exception):
    """A user-facing error: the message says what was wrong and how to fix it."""


class ServerError(MoseError):
    """A fault on the server's side that the client cannot fix by changing its request (HTTP 500)."""


class UnavailableError(ServerError):
    """Something the request needs is not available on this server yet (HTTP 503)."""


class ManifestError(MoseError):
    """The expert manifest is malformed or violates a rule."""


class ArtifactError(MoseError):
    """An expert's files are missing, unsafe, or do not match their recorded digests."""


class StoredArtifactError(ArtifactError, ServerError):
    """A registered expert's stored files are missing or no longer match their digests."""


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
