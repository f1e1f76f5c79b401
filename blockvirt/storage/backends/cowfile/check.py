"""Offline consistency check of a data directory (`blockvirt check`).

Damage (exit status 1): catalog rows pointing at missing layers or files, unreadable layer
headers, chains with cycles, DATA and ZERO set at once, missing pool directories, two pools on
one directory (through a symlink: their files are not looked at for leaks, nor removed).
Not damage, but reported: files no catalog row owns (leaks, e.g. from a crash during a
create), layers nothing references any more, torn journal tails (an interrupted commit, which
replay ignores) and map entries past a layer's size (an interrupted resize). `--repair`
removes leaks and garbage and cuts torn tails; it only ever removes files named like layer
files (other files in a pool directory are reported and left alone).
"""

from __future__ import annotations

import os
import sqlite3

from blockvirt.storage import pooldirs
from blockvirt.storage.backends.cowfile import layout
from blockvirt.storage.backends.cowfile.layer import LAYER_FILE_RE, layer_paths
from blockvirt.storage.backends.cowfile.layer_map import CLUSTER_BLOCKS
from blockvirt.storage.catalog import FILE_BACKEND, Catalog
from blockvirt.storage.check import Report
from blockvirt.storage.fileio import REAL, FileIO


def check_data_dir(data_dir: str, *, repair: bool = False, io: FileIO = REAL) -> Report:
    report = Report()
    if not os.path.exists(os.path.join(data_dir, "catalog.sqlite")):
        report.damage.append(f"no catalog in {data_dir!r}")
        return report
    try:
        cat = Catalog(data_dir)
    except sqlite3.DatabaseError as e:
        report.damage.append(f"catalog unreadable: {e}")
        return report
    try:
        _check(cat, report, repair, io)
    finally:
        cat.close()
    return report


def _check(cat: Catalog, report: Report, repair: bool, io: FileIO) -> None:
    layers = {r.id: r for r in cat.layers()}
    report.layers = len(layers)
    volumes = cat.volumes()
    report.volumes = len(volumes)
    for v in volumes:
        if v.head not in layers:
            report.damage.append(f"volume {v.name}: head layer {v.head} missing")
    for s in cat.all_snapshots():
        if s.layer not in layers:
            report.damage.append(f"snapshot {s.volume}@{s.name}: layer {s.layer} missing")
    for rec in layers.values():
        if rec.parent is not None and rec.parent not in layers:
            report.damage.append(f"layer {rec.id}: parent {rec.parent} missing")
        seen = {rec.id}
        cur = rec.parent
        while cur is not None and cur in layers:
            if cur in seen:
                report.damage.append(f"layer {rec.id}: chain has a cycle")
                break
            seen.add(cur)
            cur = layers[cur].parent
        _check_layer(cat, rec.id, rec.size, report, repair, io)
    live = cat.live_layers()
    garbage = [r for r in layers.values() if r.id not in live]
    for rec in garbage:
        report.leaks.append(f"layer {rec.id} is referenced by nothing")
    if repair and garbage:
        ids = {r.id for r in garbage}
        # Children first: a garbage layer may be the parent of another.
        while ids:
            leaves = [i for i in ids if not any(layers[j].parent == i for j in ids)]
            cycle = not leaves
            if cycle:  # garbage layers in a cycle: none is live, all of them go
                leaves = sorted(ids)
            with cat.transaction() as t:
                if cycle:  # each is the other's parent: no delete would pass the foreign key
                    for i in leaves:
                        t.set_layer_parent(i, None)
                for i in leaves:
                    t.delete_layer(i)
            for i in leaves:
                for path in layer_paths(cat.layer_dir(layers[i]), i):
                    io.unlink(path)
                report.repaired.append(f"removed unreferenced layer {i}")
                ids.discard(i)
    # Files in pools that no layer owns.
    known = {os.path.basename(p) for r in layers.values() for p in layer_paths(cat.layer_dir(r), r.id)}
    pools = cat.pools()
    shared = pooldirs.shared(pools)
    for pool in pools:
        if pool.backend != FILE_BACKEND:
            continue
        if not os.path.isdir(pool.path):
            report.damage.append(f"pool {pool.name}: directory {pool.path} missing")
            continue
        if pool.name in shared:
            # Each pool would take the other's files for strangers: nothing is removed here
            # until an operator gives each pool its own directory.
            others = shared[pool.name]
            if all(pool.name < o for o in others):  # reported once, by the first of them
                names = ", ".join([pool.name, *others])
                report.damage.append(
                    f"pools {names} share one directory ({pooldirs.real(pool.path)}): give each "
                    "pool its own directory (move the files of each pool's layers there and fix "
                    "the path), or nothing is safe from the orphan sweep"
                )
            continue
        for entry in sorted(os.listdir(pool.path)):
            if entry in known:
                continue
            if not LAYER_FILE_RE.fullmatch(entry):
                report.notes.append(f"pool {pool.name}: {entry} is not blockvirt's (left alone)")
                continue
            report.leaks.append(f"pool {pool.name}: file {entry} belongs to no layer")
            if repair:
                io.unlink(os.path.join(pool.path, entry))
                report.repaired.append(f"removed {entry} from pool {pool.name}")


def _check_layer(cat: Catalog, layer_id: str, size: int, report: Report, repair: bool, io: FileIO) -> None:
    rec = cat.layer(layer_id)
    assert rec is not None
    data_path, map_path = layer_paths(cat.layer_dir(rec), layer_id)
    if not io.exists(data_path):
        report.damage.append(f"layer {layer_id}: data file missing")
    if not io.exists(map_path):
        report.damage.append(f"layer {layer_id}: map file missing")
        return
    raw = io.read_file(map_path)
    try:
        layout.decode_header(raw)
    except layout.LayoutError as e:
        report.damage.append(f"layer {layer_id}: {e}")
        return
    replay = layout.decode_journal(raw)
    nclusters = -(-size // (CLUSTER_BLOCKS * 4096))
    beyond = 0
    for cluster, data, zero in replay.entries:
        if cluster >= nclusters:
            beyond += 1  # left by a resize a crash interrupted: ignored at this size
            continue
        if data & zero:
            report.damage.append(f"layer {layer_id}: cluster {cluster} has blocks both DATA and ZERO")
            break
    if beyond:
        report.notes.append(f"layer {layer_id}: {beyond} map entries past its size (ignored)")
    if replay.torn:
        report.notes.append(f"layer {layer_id}: torn journal tail after byte {replay.valid_end} (ignored)")
        if repair:
            fd = io.open(map_path, write=True)
            try:
                io.truncate(fd, replay.valid_end)
                io.fsync(fd)
            finally:
                io.close(fd)
            report.repaired.append(f"layer {layer_id}: cut torn journal tail")
