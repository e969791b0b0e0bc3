"""Raw userfaultfd and PAGEMAP_SCAN bindings: the syscall, ioctl numbers and structs.

The numbers and layouts are the ones checked in
shared/design/linux-uffd.md.  Everything goes through ``fcntl.ioctl`` with a
mutable buffer (~0.6 µs a call, and the GIL is released during the call);
higher layers (dirty.py, postcopy.py, guest_main.py) decide policy.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from agents.vm.errors import NOT_ROOT_NOTE, UffdFeatureMissing, UffdUnavailable

SYS_userfaultfd = 323  # x86_64
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA

UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_WRITEPROTECT = 0xC018AA06
PAGEMAP_SCAN = 0xC0606610

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1
UFFD_PAGEFAULT_FLAG_WP = 2
UFFD_MSG_SIZE = 32

FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
FEATURE_MISSING_HUGETLBFS = 1 << 4
FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
FEATURE_WP_UNPOPULATED = 1 << 13
FEATURE_WP_ASYNC = 1 << 15

FEATURE_NAMES = {
    FEATURE_PAGEFAULT_FLAG_WP: "PAGEFAULT_FLAG_WP",
    FEATURE_MISSING_HUGETLBFS: "MISSING_HUGETLBFS (Linux ≥ 4.11)",
    FEATURE_MISSING_SHMEM: "MISSING_SHMEM (Linux ≥ 4.11)",
    FEATURE_WP_HUGETLBFS_SHMEM: "WP_HUGETLBFS_SHMEM (Linux ≥ 5.19)",
    FEATURE_WP_UNPOPULATED: "WP_UNPOPULATED (Linux ≥ 6.4)",
    FEATURE_WP_ASYNC: "WP_ASYNC (Linux ≥ 6.7)",
}

REGISTER_MODE_MISSING = 1
REGISTER_MODE_WP = 2
COPY_MODE_DONTWAKE = 1
WRITEPROTECT_MODE_WP = 1

PM_SCAN_WP_MATCHING = 1
PM_SCAN_CHECK_WPASYNC = 2
PAGE_IS_WPALLOWED = 1
PAGE_IS_WRITTEN = 2
PAGE_IS_PRESENT = 8

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int]

_probed_features: int | None = None


def user_mode_only() -> bool:
    """Non-root processes may only open user-mode-only uffds here (sysctl is 0)."""
    return os.geteuid() != 0


def userfaultfd(*, nonblock: bool = True) -> int:
    """Open a userfaultfd (close-on-exec; non-blocking so the agent can poll it)."""
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
    if user_mode_only():
        flags |= UFFD_USER_MODE_ONLY
    fd = int(_syscall(SYS_userfaultfd, flags))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        raise UffdUnavailable(
            "userfaultfd: syscall 323 not implemented: the kernel needs CONFIG_USERFAULTFD "
            "(Linux ≥ 4.3; ≥ 6.7 for write-protect async)"
        )
    if err == errno.EPERM:
        raise UffdUnavailable(
            f"userfaultfd: permission denied for uid {os.geteuid()}: run the agent as root "
            "(or with CAP_SYS_PTRACE), or set sysctl vm.unprivileged_userfaultfd=1"
        )
    raise UffdUnavailable(f"userfaultfd: {os.strerror(err)} (errno {err})")


def api(fd: int, features: int) -> tuple[int, int]:
    """UFFDIO_API handshake; returns (features granted, ioctls bitmask)."""
    buf = bytearray(struct.pack("<QQQ", UFFD_API, features, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_API, buf, True)
    except OSError as e:
        raise UffdFeatureMissing(
            f"UFFDIO_API: features 0x{features:x} refused ({e.strerror}); "
            f"kernel offers 0x{supported_features():x}"
        ) from e
    _api, got, ioctls = struct.unpack("<QQQ", buf)
    return got, ioctls


def supported_features() -> int:
    """All features this kernel's userfaultfd offers (probed once, on a throwaway fd)."""
    global _probed_features
    if _probed_features is None:
        fd = userfaultfd()
        try:
            buf = bytearray(struct.pack("<QQQ", UFFD_API, 0, 0))
            fcntl.ioctl(fd, UFFDIO_API, buf, True)
            _probed_features = struct.unpack("<QQQ", buf)[1]
        finally:
            os.close(fd)
    return _probed_features


def open_uffd(features: int, purpose: str) -> int:
    """A uffd with exactly ``features`` enabled, or a one-line error naming what is missing."""
    have = supported_features()
    missing = features & ~have
    if missing:
        names = (
            ", ".join(name for bit, name in FEATURE_NAMES.items() if missing & bit)
            or f"0x{missing:x}"
        )
        raise UffdFeatureMissing(
            f"userfaultfd for {purpose}: kernel lacks feature {names}; "
            f"this kernel ({os.uname().release}) offers 0x{have:x}"
            + (f"; {NOT_ROOT_NOTE}" if user_mode_only() else "")
        )
    fd = userfaultfd()
    try:
        api(fd, features)
    except BaseException:
        os.close(fd)
        raise
    return fd


def register(fd: int, start: int, length: int, mode: int) -> int:
    """UFFDIO_REGISTER; returns the ioctls the range supports."""
    buf = bytearray(struct.pack("<QQQQ", start, length, mode, 0))
    fcntl.ioctl(fd, UFFDIO_REGISTER, buf, True)
    return int(struct.unpack_from("<Q", buf, 24)[0])


def unregister(fd: int, start: int, length: int) -> None:
    fcntl.ioctl(fd, UFFDIO_UNREGISTER, struct.pack("<QQ", start, length))


def wake(fd: int, start: int, length: int) -> None:
    fcntl.ioctl(fd, UFFDIO_WAKE, struct.pack("<QQ", start, length))


def writeprotect(fd: int, start: int, length: int, *, protect: bool = True) -> None:
    mode = WRITEPROTECT_MODE_WP if protect else 0
    buf = bytearray(struct.pack("<QQQ", start, length, mode))
    fcntl.ioctl(fd, UFFDIO_WRITEPROTECT, buf, True)


def buffer_address(obj: object) -> int:
    """Address of the first byte of a buffer-protocol object (read-only ones too)."""
    import numpy as np

    arr = np.frombuffer(obj, dtype=np.uint8)  # type: ignore[call-overload]
    return int(arr.ctypes.data)
