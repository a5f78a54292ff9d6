"""Bearer-token auth: the key comes from an environment variable, never from a config file."""

from __future__ import annotations

import hmac
import os

from mmjobs.serve.protocol import APIError

__all__ = ["api_key_from_env", "check_bearer"]

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mmjobs"'}


def api_key_from_env(name: str | None) -> str | None:
    """The API key in `$name`, or None when `name` is None (auth off).

    Raises:
        ValueError: `name` is set but the variable is unset or empty; starting without auth
            when the operator asked for it would expose the model.
    """
    if not name:
        return None
    key = os.environ.get(name, "")
    if not key.strip():
        raise ValueError(f"the API key variable ${name} is unset or empty: export the key in "
                         f"{name}, or serve without auth (no key variable)")
    return key.strip()


def check_bearer(authorization: str | None, key: str | None) -> None:
    """Accept the request if auth is off or `Authorization: Bearer <key>` matches.

    Raises:
        APIError: 401 with a `WWW-Authenticate` challenge.
    """
    if key is None:
        return
    if not authorization:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                       code="missing_api_key", headers=_CHALLENGE)
    scheme, _, token = authorization.partition(" ")
    # compare_digest: the comparison takes the same time wherever the strings differ.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             key.encode()):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers=_CHALLENGE)
