"""API keys: where the key comes from, and checking a request's Authorization header."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

ENV_VAR = "TRTDIST_API_KEY"


def resolve_api_key(flag: str | None, key_file: str | None,
                    env: dict[str, str] | None = None) -> str | None:
    """The key from `--api-key`, else `--api-key-file` (first line), else $TRTDIST_API_KEY.

    NOTE: a key on the command line is visible to every user in `ps`; the file or the
    environment variable keep it private."""
    if flag is not None and key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if flag is not None:
        key = flag
    elif key_file is not None:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read --api-key-file {key_file}: {e.strerror}") from None
        if not key:
            raise ValueError(f"--api-key-file {key_file} is empty")
    else:
        key = (os.environ if env is None else env).get(ENV_VAR) or None
    if key is not None and not key.strip():
        raise ValueError("the API key is empty")
    return key


def authorized(header: str | None, key: str) -> bool:
    """Whether `Authorization: <header>` carries `key` (scheme case-insensitive, RFC 7235;
    compared in constant time)."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())
