"""Migration URIs as QEMU spells them: ``tls:HOST:PORT``, ``tcp:HOST:PORT``, ``file:PATH``.

godwit only speaks TLS between agents; ``tcp:`` exists for benchmarks and
unit tests behind ``--insecure-plaintext``.  IPv6 hosts are bracketed, as in
QEMU (``tls:[::1]:4444``).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMES = ("tls", "tcp", "file")


@dataclass(frozen=True, slots=True)
class MigrationURI:
    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}:{host}:{self.port}"

    @property
    def is_network(self) -> bool:
        return self.scheme in ("tls", "tcp")


def parse_uri(text: str) -> MigrationURI:
    """Parse a migration URI or raise ValueError saying what is wrong with it."""
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            f"migration URI {text!r}: scheme must be one of {', '.join(SCHEMES)} (e.g. tls:HOST:PORT)"
        )
    if scheme == "file":
        if not rest:
            raise ValueError(f"migration URI {text!r}: file: needs a path")
        return MigrationURI("file", path=rest)
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0 or rest[close + 1 : close + 2] != ":":
            raise ValueError(
                f"migration URI {text!r}: bracketed IPv6 host must be followed by :PORT"
            )
        host, port_text = rest[1:close], rest[close + 2 :]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise ValueError(f"migration URI {text!r}: expected {scheme}:HOST:PORT")
    if not host:
        raise ValueError(f"migration URI {text!r}: host is empty")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"migration URI {text!r}: port {port_text!r} is not a number in 1..65535")
    return MigrationURI(scheme, host=host, port=int(port_text))
