"""Bearer-token auth with the key from an environment variable."""

from __future__ import annotations

import pytest

from mmjobs.serve.auth import api_key_from_env, check_bearer
from mmjobs.serve.protocol import APIError


def test_key_comes_from_the_named_variable(monkeypatch):
    assert api_key_from_env(None) is None
    monkeypatch.setenv("SERVE_KEY", "s3cret ")
    assert api_key_from_env("SERVE_KEY") == "s3cret"
    monkeypatch.setenv("SERVE_KEY", "")
    with pytest.raises(ValueError, match=r"\$SERVE_KEY is unset or empty"):
        api_key_from_env("SERVE_KEY")


@pytest.mark.parametrize(("header", "code"), [
    (None, "missing_api_key"), ("", "missing_api_key"), ("Bearer wrong", "invalid_api_key"),
    ("Basic s3cret", "invalid_api_key"), ("Bearer", "invalid_api_key"),
])
def test_missing_or_wrong_keys_are_401(header, code):
    with pytest.raises(APIError) as err:
        check_bearer(header, "s3cret")
    assert err.value.status == 401 and err.value.code == code
    assert "Bearer" in err.value.headers["WWW-Authenticate"]
    assert "s3cret" not in err.value.message


def test_right_key_or_no_auth_passes():
    check_bearer("Bearer s3cret", "s3cret")
    check_bearer("bearer s3cret", "s3cret")
    check_bearer(None, None)
