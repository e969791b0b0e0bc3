"""One-line errors for the guest runtime: what is missing, where, and what enables it.

Every check that could otherwise degrade into a mode that loses writes raises
one of these instead; nothing in agents/vm falls back silently.
"""

from __future__ import annotations


class GuestRuntimeError(RuntimeError):
    """Base of every error agents/vm raises on purpose."""


class UffdUnavailable(GuestRuntimeError):
    """userfaultfd(2) cannot be opened here (kernel config, permission)."""


class UffdFeatureMissing(GuestRuntimeError):
    """The kernel's userfaultfd lacks a feature we rely on (e.g. WP_ASYNC)."""


class PagemapScanUnavailable(GuestRuntimeError):
    """PAGEMAP_SCAN on /proc/PID/pagemap is not available or not permitted."""


class HugePagesUnavailable(GuestRuntimeError):
    """Not enough 2 MiB huge pages are reserved for a hugetlb RAM block."""


class GuestGone(GuestRuntimeError):
    """The guest process exited or closed its control socket."""


class GuestCommandError(GuestRuntimeError):
    """The guest refused or failed a control command."""


class DeviceVersionError(GuestRuntimeError):
    """A device section is newer than this runtime knows, or malformed."""


class PlacementError(GuestRuntimeError):
    """UFFDIO_COPY / ZEROPAGE / WAKE failed in a way we cannot resolve."""


NOT_ROOT_NOTE = (
    "not root: using UFFD_USER_MODE_ONLY (vm.unprivileged_userfaultfd=0), so kernel "
    "accesses to missing guest pages (e.g. write(2) from guest memory) fail with EFAULT "
    "instead of faulting; run the agent as root for full postcopy"
)


class GuestAttached(GuestCommandError):
    """Adoption refused: another agent is attached to the guest (one at a time)."""
