"""Missing kernel features and permissions fail with one line naming what is missing and
what enables it; a guest stuck on a missing page can still be quit."""

import os
import subprocess
import sys

import pytest
import trio

from agents.vm import uffd as U
from agents.vm.errors import UffdFeatureMissing

pytestmark = pytest.mark.root


def test_missing_feature_is_named():
    with pytest.raises(
        UffdFeatureMissing, match=r"dirty tracking: kernel lacks feature 0x10000000000"
    ):
        U.open_uffd(U.FEATURE_WP_ASYNC | (1 << 40), "dirty tracking")


def test_non_root_gets_user_mode_only_uffd():
    code = (
        "import os; from agents.vm import uffd as U;"  # import first: the interpreter's tree is root-only
        "os.setgid(65534); os.setuid(65534);"
        "assert U.user_mode_only();"
        "fd = U.open_uffd(U.FEATURE_MISSING_SHMEM, 'postcopy'); print('ok', fd >= 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    if "PermissionError" in out.stderr and "setuid" in out.stderr:
        pytest.skip("cannot drop privileges here")
    assert out.stdout.strip() == "ok True", out.stderr


async def test_quit_works_while_a_vcpu_sleeps_on_a_missing_page(guests):
    g = await guests.incoming(ram_size=1 << 20, workload="stress:rate=4M,mode=read", postcopy=True)
    await g.cont()
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(g.placer().fileno())
    exit = await g.quit()
    assert exit.clean
    assert not os.path.exists(f"/proc/{g.pid}")  # noqa: ASYNC240
