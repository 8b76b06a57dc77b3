"""Object-store errors as the user should read them: what failed, where (the URL), what to do; no credential.

obstore's messages hold the request URL and the server's XML reply; they never hold the secret, but a value
given with --storage-option might appear in one (an endpoint with user info, a token in a query), so every
option value is scrubbed from every message before it leaves this module.
"""

from __future__ import annotations

from contextlib import contextmanager

from pipeline.store.storage import StorageError

# what the server or the client said -> what the user should do
HINTS = (
    (("NoSuchBucket", "bucket does not exist", "container not found", "ContainerNotFound"),
     "the bucket does not exist: create it first, or check the URL"),
    (("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403 Forbidden", "401 Unauthorized",
      "InvalidToken", "ExpiredToken", "AuthenticationFailed", "Unauthenticated", "PermissionDenied"),
     "access refused: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS,"
     " AZURE_STORAGE_* in the environment, or --storage-option) and that they may read and write this bucket"),
    (("Connection refused", "error trying to connect", "dns error", "error sending request", "timed out",
      "builder error"),
     "the storage endpoint cannot be reached: check AWS_ENDPOINT_URL (or --storage-option endpoint=...) "
     "and the network"),
    (("Missing bucket name", "Unable to recognise URL", "Unknown url scheme", "UnknownConfigurationKey",
      "Configuration key"),
     "the URL or a --storage-option is not valid for this store"),
)
MAX_DETAIL = 300


class ObjectErrors:
    """Turns obstore errors raised inside `context` into StorageError (or FileNotFoundError for a missing object)."""

    def __init__(self, location: str, options: dict[str, str]):
        self.location = location
        self._secrets = [v for v in options.values() if isinstance(v, str) and len(v) >= 4]

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    @contextmanager
    def context(self, action: str, rel: str = ""):
        from obstore.exceptions import AlreadyExistsError, BaseError, PreconditionError

        try:
            yield
        except (AlreadyExistsError, PreconditionError):
            raise  # answers of conditional requests: the caller decides
        except FileNotFoundError as err:
            if "NoSuchBucket" in str(err):  # S3 answers 404 for a missing bucket too: say which
                raise StorageError(self.message(action, rel, str(err))) from None
            raise FileNotFoundError(f"{self.where(rel)}: not found") from None
        except BaseError as err:
            raise StorageError(self.message(action, rel, str(err))) from None

    def where(self, rel: str) -> str:
        return f"{self.location}/{rel}" if rel and rel != "/" else self.location

    def message(self, action: str, rel: str, detail: str) -> str:
        detail = self.scrub(detail)
        hint = next((h for keys, h in HINTS if any(k.lower() in detail.lower() for k in keys)), None)
        first = " ".join(detail.split())[:MAX_DETAIL]
        return f"{self.where(rel)}: cannot {action}: {hint or 'the object store refused the request'} ({first})"
