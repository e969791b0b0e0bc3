"""Everything godwit does on a host, under trio: the agent daemon, channels and
TLS, the source and destination sides of a migration, the control server, the
PKI tool, the CLI, and ``agents.vm`` — the guest runtime."""
