"""Hub failures as one line each: the single place that maps huggingface_hub errors to SpraError."""

from __future__ import annotations

from .errors import SpraError

# A Hub repository id, `org/name`.
REPO_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]"


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of whichever HTTP client this huggingface_hub uses."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            kinds.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(kinds)


class hub_errors:
    """Turn any huggingface_hub failure inside the block into one SpraError line naming the repository.

    `offline` is the message for HF_HUB_OFFLINE, which means different things to a push and a cache read.
    """

    def __init__(
        self,
        repo_id: str,
        revision: str | None = None,
        endpoint: str | None = None,
        offline: str = "HF_HUB_OFFLINE is set, so the Hub cannot be reached (unset it to push or pull)",
    ):
        self.repo_id, self.revision, self.endpoint, self.offline = repo_id, revision, endpoint, offline

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, SpraError) or not isinstance(e, Exception):
            return False
        raise SpraError(self._message(e), self.repo_id) from None

    def _message(self, e: Exception) -> str:
        from huggingface_hub import constants, errors

        offline = errors.OfflineModeIsEnabled
        if (
            isinstance(e, offline)
            or isinstance(e.__cause__, offline)
            or (isinstance(e, errors.LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE)
        ):
            return self.offline
        if isinstance(e, errors.RevisionNotFoundError):
            return f"no revision {self.revision!r} on the Hub"
        if isinstance(e, errors.RepositoryNotFoundError):
            return "no such repository on the Hub (or no access: check your token: huggingface-cli login or HF_TOKEN)"
        if isinstance(e, errors.HfHubHTTPError) and e.response is not None:
            status = e.response.status_code
            if status in (401, 403):
                return f"the Hub refused access ({status}): check your token: huggingface-cli login or HF_TOKEN"
            if status == 404:
                return "not found on the Hub (404)"
            return f"the Hub answered {status}: {_first_line(e)}"
        transport = _transport_errors()
        if (
            isinstance(e, transport)
            or isinstance(e.__cause__, transport)
            or isinstance(e, errors.LocalEntryNotFoundError)
        ):
            return f"the Hub at {self.endpoint or constants.ENDPOINT} cannot be reached (network down or HF_ENDPOINT wrong?)"
        return f"Hub request failed ({e.__class__.__name__}: {_first_line(e)})"


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else e.__class__.__name__
