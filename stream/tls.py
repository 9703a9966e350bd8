"""stream's own TLS (``ssl_certfile`` / ``ssl_keyfile``), for a deployment without a proxy in front.

The server context is built here rather than by uvicorn, because stream does the handshake
itself (``transports/http_protocol``): a socket is counted against the connection limits from
accept, and its handshake must end within ``ssl_handshake_timeout``. uvicorn hands TLS to the
event loop, which counts nothing until the handshake is done and gives it 60 s.

The demo providers connect to this very process (``/demo/…``); over TLS they trust exactly the
certificate it serves (``own_certificate``), whatever names it was issued for.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from .errors import ConfigError
from .settings import ServerSettings

__all__ = ["own_certificate", "server_context"]


def server_context(server: ServerSettings) -> ssl.SSLContext | None:
    """The context serving https:// and wss://, or None without ``ssl_certfile``; ConfigError
    says which file is wrong and how."""
    if server.ssl_certfile is None:
        if server.ssl_keyfile is not None:
            raise ConfigError(["server.ssl_keyfile: set, but server.ssl_certfile is not (the certificate it goes with)"])
        return None
    for name, path in (("ssl_certfile", server.ssl_certfile), ("ssl_keyfile", server.ssl_keyfile)):
        try:
            if path is not None:
                open(path, "rb").close()  # load_cert_chain's own error names no file
        except OSError as exc:
            raise ConfigError([f"server.{name}: cannot read {path}: {exc.strerror or exc}"]) from None
    if server.ssl_keyfile is None and b"PRIVATE KEY-----" not in Path(server.ssl_certfile).read_bytes():
        raise ConfigError(["server.ssl_certfile: holds no private key; name the key's file in server.ssl_keyfile"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # An encrypted key would make OpenSSL ask for its pass phrase on the terminal.
        context.load_cert_chain(server.ssl_certfile, server.ssl_keyfile, password=_no_pass_phrase)
    except _Encrypted:
        raise ConfigError([f"server.ssl_keyfile: the private key is encrypted; stream reads unencrypted keys only "
                           f"(openssl pkey -in {server.ssl_keyfile or server.ssl_certfile} -out key.pem)"]) from None
    except OSError as exc:  # ssl.SSLError is one: not PEM, or a key that is not the certificate's
        names = "server.ssl_certfile" + (" / server.ssl_keyfile" if server.ssl_keyfile else "")
        raise ConfigError([f"{names}: expected a PEM certificate chain and its private key: {_reason(exc)}"]) from None
    context.set_alpn_protocols(["http/1.1"])
    return context


def own_certificate(certfile: str) -> ssl.SSLContext:
    """A client context that trusts the certificate in ``certfile`` and nothing else, for this
    process's connections to itself over loopback (the names on it are the public ones)."""
    context = ssl.create_default_context(cafile=certfile)
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the served certificate itself is the anchor
    return context


class _Encrypted(Exception):
    """OpenSSL asked for a pass phrase."""


def _no_pass_phrase() -> str:
    raise _Encrypted


def _reason(exc: OSError) -> str:
    return getattr(exc, "reason", None) or exc.strerror or str(exc)
