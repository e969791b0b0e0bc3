"""Guest-runtime test wiring: every guest a test starts is quit afterwards, even on failure."""

import pytest

from agents.vm.guest import Guest, GuestSpec


class Guests:
    def __init__(self) -> None:
        self.started: list[Guest] = []

    async def start(self, **kw) -> Guest:
        g = await Guest.start(GuestSpec(**kw))
        self.started.append(g)
        return g

    async def incoming(self, blocks=None, postcopy=False, **kw) -> Guest:
        g = await Guest.start_incoming(GuestSpec(**kw), blocks, postcopy=postcopy)
        self.started.append(g)
        return g


@pytest.fixture
async def guests():
    g = Guests()
    try:
        yield g
    finally:
        for guest in g.started:
            guest.kill()
            await guest.quit()
