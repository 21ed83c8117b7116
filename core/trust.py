"""Which stores this user wrote: the config a store records is signed with a per-user secret
key, the way Jupyter trusts the notebooks a user wrote.

A store's config can name code (``--model mymodule:factory``) that ``--resume`` and
``lscape measure`` import. A store can come from anyone, so such code is imported only when
the user trusts the store (``--trust-store``), or when the config is the one this user's lscape
wrote: an HMAC-SHA256 of its canonical JSON under the key in ``$XDG_CONFIG_HOME/lscape/secret``
(``~/.config/lscape/secret``; ``$LSCAPE_SECRET_FILE`` names another file), created with mode
0600 on first use, stored as the root attribute ``config_signature``. A config edited since,
a store from another user or machine, or one written before signatures carry no valid
signature and still need ``--trust-store``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from typing import Any, Mapping

__all__ = ["SIGNATURE_ATTR", "secret_path", "sign_config", "signed_config", "signed_by_user"]

#: the root attribute holding the signature of the root attribute ``config``
SIGNATURE_ATTR = "config_signature"


def secret_path() -> str:
    """Where this user's key lives."""
    if os.environ.get("LSCAPE_SECRET_FILE"):
        return os.environ["LSCAPE_SECRET_FILE"]
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "lscape", "secret")


def _key(create: bool) -> bytes | None:
    path = secret_path()
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
        if key:
            return key
    except OSError:
        pass
    if not create:
        return None
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return _key(create=False)
    except OSError:  # a read-only home: stores are not signed, and --trust-store is needed
        return None
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_hex(32).encode())
    return _key(create=False)


def _canonical(config: Mapping[str, Any]) -> bytes:
    # as stored: JSON (tuples become lists), keys sorted, no spaces
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign_config(config: Mapping[str, Any], create: bool = True) -> str | None:
    """The signature of ``config`` with this user's key (None: no key to sign with)."""
    key = _key(create)
    if key is None:
        return None
    return hmac.new(key, _canonical(config), hashlib.sha256).hexdigest()


def signed_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The root attributes recording ``config``: itself and its signature."""
    signature = sign_config(config)
    return {"config": config, **({SIGNATURE_ATTR: signature} if signature else {})}


def signed_by_user(attrs: Mapping[str, Any]) -> bool:
    """Whether a store's root attributes hold a config this user's lscape wrote, unchanged."""
    signature, config = attrs.get(SIGNATURE_ATTR), attrs.get("config")
    if not isinstance(signature, str) or not isinstance(config, Mapping):
        return False
    expected = sign_config(config, create=False)
    return expected is not None and hmac.compare_digest(expected, signature)
