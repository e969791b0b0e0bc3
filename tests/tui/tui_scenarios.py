"""Guests and MigrationInfo answers for each phase, shaped as the agents send them."""

from __future__ import annotations

from typing import Any

GiB = 1 << 30
MiB = 1 << 20


def guest(name: str = "vm1", status: str = "running", migration: Any = None) -> dict[str, Any]:
    return {
        "name": name,
        "memory": GiB,
        "page-size": 4096,
        "workload": "stress:rate=200M,wss=512M",
        "status": status,
        "pid": 4242,
        "migration": migration,
    }


def channels(*, preempt: bool = False, up: bool = True, age: float = 3) -> list[dict[str, Any]]:
    names = ["main", "return"] + (["preempt"] if preempt else []) + ["multifd-0", "multifd-1"]
    return [
        {
            "name": n,
            "connected": up,
            "bytes-sent": (700 * MiB if n == "main" else 4 * MiB * (i + 1)),
            "bytes-received": 12 * 1024 * (i + 1),
            "last-frame-age-ms": age if up else 4200 + i * 100,
        }
        for i, n in enumerate(names)
    ]


def precopy(role: str = "source", status: str = "active") -> dict[str, Any]:
    return {
        "guest": "vm1",
        "role": role,
        "status": status,
        "setup-time": 14,
        "total-time": 6350,
        "expected-downtime": 480,
        "cpu-throttle-percentage": 0,
        "uri": "tls:dst.lab:4444",
        "ram": {
            "transferred": 820 * MiB,
            "remaining": 310 * MiB,
            "total": GiB,
            "duplicate": 51200,
            "normal": 209920,
            "normal-bytes": 820 * MiB,
            "dirty-pages-rate": 48000,
            "mbps": 1180.0,
            "dirty-sync-count": 4,
            "precopy-bytes": 820 * MiB,
            "page-size": 4096,
            "multifd-bytes": 120 * MiB,
        },
        "channels": channels(),
    }


def postcopy(role: str = "source", status: str = "postcopy-active") -> dict[str, Any]:
    info = precopy(role, status)
    info["total-time"] = 9120
    info["downtime"] = 212
    info["ram"].update(
        {
            "transferred": 960 * MiB,
            "remaining": 96 * MiB,
            "postcopy-bytes": 140 * MiB,
            "postcopy-requests": 1873,
            "dirty-sync-count": 5,
        }
    )
    info["postcopy-blocktime"] = 388
    info["postcopy-vcpu-blocktime"] = [201, 187]
    info["postcopy-latency"] = 41_500
    info["postcopy-latency-dist"] = [0, 0, 0, 0, 3, 40, 310, 820, 402, 150, 61, 12, 0, 2]
    info["channels"] = channels(preempt=True)
    return info


def paused(role: str = "source") -> dict[str, Any]:
    info = postcopy(role, "postcopy-paused")
    info["pauses"] = 1
    info["recoveries"] = 0
    info["channels"] = channels(preempt=True, up=False)
    return info


def completed(role: str = "source") -> dict[str, Any]:
    info = postcopy(role, "completed")
    info["ram"].update({"transferred": 1090 * MiB, "remaining": 0})
    del info["expected-downtime"]
    info["total-time"] = 11800
    return info


def failed(role: str = "source") -> dict[str, Any]:
    info = precopy(role, "failed")
    info["error-desc"] = "channel main: TLS peer certificate not signed by the godwit CA"
    info["channels"] = channels(up=False)
    return info


def progress_series(info: dict[str, Any], n: int = 24) -> list[dict[str, Any]]:
    """MIGRATION_PROGRESS infos with a varying throughput and dirty rate, deterministic."""
    out = []
    for i in range(n):
        step = dict(info)
        step["ram"] = dict(info["ram"])
        step["ram"]["mbps"] = 700.0 + 40.0 * ((i * 7) % 13)
        step["ram"]["dirty-pages-rate"] = 20000 + 3000 * ((i * 5) % 11)
        out.append(step)
    out[-1] = info
    return out
