"""Everything godwit does on a host, under trio: the agent daemon, channels and
TLS, the source and destination sides of a migration, the control server, the
PKI tool, the CLI, and ``agents.vm`` — the guest runtime."""


def version() -> str:
    """godwit's installed version (``0+unknown`` when run from a bare source tree)."""
    from importlib import metadata

    try:
        return metadata.version("godwit")
    except metadata.PackageNotFoundError:
        return "0+unknown"
