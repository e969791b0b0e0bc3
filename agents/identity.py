"""Who an agent is on the wire: its certificate files, and the TLS contexts made from them.

Apart from agents/pki.py (which makes the files, with ``cryptography``) and
agents/tls.py (the trio stream) so that a preempt worker
(agents/preempt_worker.py) can build its contexts without importing either:
a worker's start-up is time a switch to postcopy waits for.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Identity", "client_context", "server_context"]


@dataclass(frozen=True)
class Identity:
    """Where one host's TLS material lives; what ``agents.tls`` contexts are built from."""

    name: str
    ca_path: Path
    cert_path: Path
    key_path: Path


def _base_context(purpose_server: bool, identity: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose_server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    # Trust the godwit CA and nothing else: no load_default_certs().
    ctx.load_verify_locations(cafile=str(identity.ca_path))
    ctx.load_cert_chain(certfile=str(identity.cert_path), keyfile=str(identity.key_path))
    # Channels are long-lived and never resumed: no session tickets, which
    # would also be post-handshake traffic a reader has to answer for.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def server_context(identity: Identity) -> ssl.SSLContext:
    """Context for the listening side: TLS 1.3, client certificate required, godwit CA only."""
    ctx = _base_context(True, identity)
    ctx.num_tickets = 0
    return ctx


def client_context(identity: Identity) -> ssl.SSLContext:
    """Context for the dialling side: TLS 1.3, server name checked against its SANs."""
    ctx = _base_context(False, identity)
    ctx.check_hostname = True
    return ctx
