"""TLS settings as an ``ssl.SSLContext``: which CA to trust, whether to verify, which client
certificate to present. Built once at start; a file that cannot be read is a configuration
error before anything is dialled, not a connect failure later."""

from __future__ import annotations

import ssl


def tls_context(
    *,
    verify: bool = True,
    ca_file: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> ssl.SSLContext | None:
    """The context for these settings; None when they are all defaults (library defaults).

    Raises OSError (unreadable file) or ssl.SSLError (not PEM, key not matching the
    certificate); :func:`check_files` turns those into one readable reason.
    """
    if verify and ca_file is None and client_cert is None:
        return None
    # Without verification no CA is consulted: a ca_file left in place is not even read.
    context = ssl.create_default_context(cafile=ca_file if verify else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        # The key may sit in the certificate's file (client_key None).
        context.load_cert_chain(client_cert, client_key)
    return context


def check_files(
    *,
    ca_file: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> tuple[str, str] | None:
    """``(key, reason)`` for the first file that cannot be used, else None."""
    if client_key is not None and client_cert is None:
        return "client_key", "needs client_cert (the certificate the key belongs to)"
    for key, path in (("ca_file", ca_file), ("client_cert", client_cert)):
        if path is None:
            continue
        try:
            if key == "ca_file":
                ssl.create_default_context(cafile=path)
            else:
                if client_key is not None:
                    _readable("client_key", client_key)
                ssl.create_default_context().load_cert_chain(path, client_key)
        except _Unreadable as exc:
            return exc.key, exc.reason
        except OSError as exc:
            if isinstance(exc, ssl.SSLError):
                return key, f"{path}: not a usable PEM file ({exc.reason or exc})"
            return key, f"{path}: cannot read ({exc.strerror or exc})"
    return None


class _Unreadable(Exception):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


def _readable(key: str, path: str) -> None:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise _Unreadable(key, f"{path}: cannot read ({exc.strerror or exc})") from exc
