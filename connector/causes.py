"""Why a connection or request failed, in words a person reads in one glance:
``TLS: certificate verify failed for localhost``, ``connection refused``,
``timeout after 30 s``. Pure: exceptions in, one line out."""

from __future__ import annotations

import socket
import ssl

from webhook_connect.connector.proxy import ProxyError


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of the ``raise ... from`` chain (the OS's or TLS's own)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def describe(exc: BaseException, host: str, timeout: float | None = None) -> str:
    """One line saying why talking to ``host`` failed."""
    if isinstance(exc, TimeoutError) and timeout is not None:
        return f"timeout after {timeout:g} s"
    cause = root_cause(exc)
    if isinstance(cause, ProxyError):
        return str(cause)
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = cause.verify_message or ""
        return f"TLS: certificate verify failed for {host}" + (f" ({detail})" if detail else "")
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or str(cause)
        return f"TLS: {reason.replace('_', ' ').lower()} ({host})"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve {host}"
    if isinstance(cause, TimeoutError):
        return f"timeout after {timeout:g} s" if timeout is not None else "timeout"
    if isinstance(cause, ConnectionResetError):
        return "connection reset by the peer"
    text = str(exc) or type(exc).__name__
    return text
