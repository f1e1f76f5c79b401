"""One volume whose layers are gone (a file deleted, or a catalog row) among healthy ones: the
API's listing, /metrics, `nbdinfo --list` and the other volumes keep working; the broken one is
reported failed with the reason, and a client opening it is told why instead of dropped."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from pathlib import Path

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import MiB, need, qemu_io, run

pytestmark = pytest.mark.interop


def _layer_of(data_dir: Path, volume: str, snapshot: str) -> str:
    db = sqlite3.connect(data_dir / "catalog.sqlite")
    try:
        (layer,) = db.execute(
            "SELECT layer FROM snapshots WHERE volume = ? AND name = ?", (volume, snapshot)
        ).fetchone()
    finally:
        db.close()
    return str(layer)


def _damage(data_dir: Path, layer: str, how: str) -> None:
    if how == "file":
        (data_dir / "pools" / "default" / f"{layer}.map").unlink()
    else:
        db = sqlite3.connect(data_dir / "catalog.sqlite")  # foreign keys are off by default here
        try:
            db.execute("DELETE FROM snapshots WHERE layer = ?", (layer,))
            db.execute("DELETE FROM layers WHERE id = ?", (layer,))
            db.commit()
        finally:
            db.close()


@pytest.mark.parametrize("how", ["file", "row"])
def test_one_damaged_volume_does_not_break_the_others(tmp_path: Path, how: str) -> None:
    need("nbdinfo", "qemu-io", "qemu-img")
    data_dir = tmp_path / "data"
    with BlockvirtServer(data_dir) as server:
        for name in ("a", "b", "c"):
            uri = server.create_volume(name, 4 * MiB)
            qemu_io(uri, "write -P 0x5a 0 1M")
        # b's data lives in a snapshot's layer; its head (and the snapshot) read through it.
        server.api.post("/api/v1/volumes/b/snapshots", {"name": "s1"})
        qemu_io(server.uri("b"), "write -P 0x6b 1M 64k")
    layer = _layer_of(data_dir, "b", "s1")
    _damage(data_dir, layer, how)

    with BlockvirtServer(data_dir, log_level="info") as server:
        r = server.cli("volume", "list", "--json")
        assert r.returncode == 0, r.stderr
        vols = {v["name"]: v for v in json.loads(r.stdout)}
        assert set(vols) == {"a", "b", "c"}
        assert vols["b"]["state"] == "failed" and layer in vols["b"]["error"], vols["b"]
        for name in ("a", "c"):
            assert vols[name]["state"] == "ok" and vols[name]["error"] is None
            assert vols[name]["allocated"] >= MiB
        info = json.loads(server.cli("volume", "info", "b", "--json", check=True).stdout)
        assert info["state"] == "failed" and layer in info["error"]

        with urllib.request.urlopen(server.api_url + "/metrics", timeout=30) as resp:
            assert resp.status == 200
            metrics = resp.read().decode()
        assert 'blockvirt_volume_failed{volume="b"} 1.0' in metrics
        assert 'blockvirt_volume_failed{volume="a"} 0.0' in metrics
        assert 'blockvirt_volume_allocated_bytes{volume="c"}' in metrics

        # nbdinfo --list opens every export it lists: the healthy ones are described, the
        # broken one is refused with a reply (not a dropped connection, which ends the list).
        r = run(["nbdinfo", "--list", "--json", server.uri("")], check=False)
        listed = {e["export-name"]: e for e in json.loads(r.stdout)["exports"]}
        assert set(listed) == {"a", "c"}, (r.stdout, r.stderr)
        assert all(e["export-size"] == 4 * MiB for e in listed.values())
        assert "server replied with error" in r.stderr and "DEAD" not in r.stderr, r.stderr

        for name in ("a", "c"):
            assert "Pattern verification failed" not in qemu_io(server.uri(name), "read -P 0x5a 0 1M")
        r = run(["qemu-img", "info", server.uri("b")], check=False)
        assert r.returncode != 0
        assert "export 'b' is unavailable: its storage could not be opened" in r.stderr, r.stderr
        log = server.log()
        assert f"volume b cannot be opened: layer {layer}" in log
        assert "export 'b' cannot be opened" in log
        assert "Traceback" not in log
