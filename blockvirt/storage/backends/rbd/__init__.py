"""Ceph RBD: an asyncio client layer over Debian's python3-rados / python3-rbd bindings.

    cluster.py  CephConnection: one librados client instance, its pool, its control threads
    image.py    AsyncImage: data path over librbd aio, control plane off the loop
    pool.py     RbdPool: create, clone, remove, list images; pool figures
    omap.py     OmapDocument: a versioned key-value document on one RADOS object
    errors.py   CephError (connection problems) and StorageError mapping (I/O)
    bridge.py   librados/librbd completion callbacks to asyncio futures
    backend.py  RbdBackend: RBD pools behind the volume-backend seam (node.py, catalog.py)
    check.py    the offline check of RBD pools (`blockvirt check`)
    tuning.py   timeouts and intervals (pure: no bindings needed)

Importing these modules needs the bindings; nothing else in blockvirt imports them, so
blockvirt runs without Ceph installed. docs/ceph-testing.md says what was verified on
Ceph 16.2 (Pacific) and how the tests run a cluster.
"""
