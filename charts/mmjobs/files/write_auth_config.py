"""Write MLflow's basic-auth ini file from the environment (MLflow init container).

The auth database URI can contain a password (PostgreSQL), so it comes from a Secret-backed
env var and is written into a memory volume at start-up instead of living in a ConfigMap.
The admin user and password are not in the file: MLflow reads MLFLOW_AUTH_ADMIN_USERNAME and
MLFLOW_AUTH_ADMIN_PASSWORD from its own environment.

Usage: python3 write_auth_config.py OUTPUT.ini
Env: MLFLOW_AUTH_DATABASE_URI (required), MLFLOW_AUTH_DEFAULT_PERMISSION (default READ).
"""

from __future__ import annotations

import os
import sys


def render(database_uri: str, default_permission: str) -> str:
    """The ini text. MLflow parses it with configparser's default interpolation, where "%"
    starts a reference, so a URL-encoded password ("%40") is escaped as "%%40"."""
    lines = [
        "[mlflow]",
        f"default_permission = {default_permission}",
        f"database_uri = {database_uri.replace('%', '%%')}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: write_auth_config.py OUTPUT.ini", file=sys.stderr)
        return 2
    uri = os.environ.get("MLFLOW_AUTH_DATABASE_URI", "")
    if not uri:
        print("MLFLOW_AUTH_DATABASE_URI is empty: set mlflow.backend (sqlite or postgresql "
              "with existingSecret)", file=sys.stderr)
        return 2
    permission = os.environ.get("MLFLOW_AUTH_DEFAULT_PERMISSION", "READ")
    # Owner-only: the file may hold the database password.
    fd = os.open(argv[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(render(uri, permission))
    print(f"wrote {argv[0]} (default_permission={permission})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
