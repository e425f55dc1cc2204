"""Errors a request can cause. Each carries the HTTP status it should be answered with, so any host (TorchServe,
an in-process benchmark, another server) can turn it into a 4xx reply without knowing where it came from."""
from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A client mistake: the request is answered with ``status`` and a JSON body, the batch goes on."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}


class InvalidInput(RequestError):
    status = 400
    code = "invalid_input"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(RequestError):
    status = 415
    code = "unsupported_media_type"


class InternalError(RequestError):
    """A failure on the server's side, answered 500 with an id the log also holds."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, error_id: str):
        super().__init__(message)
        self.error_id = error_id

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["error"]["id"] = self.error_id
        return d


class ArtifactError(RuntimeError):
    """An exported model folder that cannot be served: missing file, hash mismatch, failed self-test."""
