"""TLS for NBD's STARTTLS: an x509 server context from a directory laid out the way qemu's
tls-creds-x509 expects it (ca-cert.pem, server-cert.pem, server-key.pem). Clients must
present a certificate signed by that CA; its names (blockvirt.server.acl.certificate_names)
are what access rules match."""

from __future__ import annotations

import os
import ssl

FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


class TLSConfigError(Exception):
    pass


def server_context(tls_dir: str) -> ssl.SSLContext:
    missing = [f for f in FILES if not os.path.isfile(os.path.join(tls_dir, f))]
    if missing:
        raise TLSConfigError(f"TLS directory {tls_dir!r} lacks {', '.join(missing)}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(os.path.join(tls_dir, "server-cert.pem"), os.path.join(tls_dir, "server-key.pem"))
        ctx.load_verify_locations(os.path.join(tls_dir, "ca-cert.pem"))
    except (ssl.SSLError, OSError) as e:
        raise TLSConfigError(f"cannot load TLS credentials from {tls_dir!r}: {e}") from e
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
