"""Everything godwit does on a host, under trio: the agent daemon, channels and
TLS, the source and destination sides of a migration, the control server, the
PKI tool, the CLI, and ``agents.vm`` — the guest runtime."""

import os

# numpy's OpenBLAS starts one worker thread per core in every process that
# imports it (agents and guest processes alike), and they spin at start-up.
# godwit does no linear algebra; on a small host those threads take CPU from
# a migration in progress (seen in perf: 2 % of a precopy's samples in the
# guest processes started during it).  Before numpy is imported anywhere.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def version() -> str:
    """godwit's installed version (``0+unknown`` when run from a bare source tree)."""
    from importlib import metadata

    try:
        return metadata.version("godwit")
    except metadata.PackageNotFoundError:
        return "0+unknown"
