"""Storage backends: each kind of storage in its own subpackage, behind the seam in
blockvirt/storage/backend.py (file pools: cowfile; Ceph RBD pools: rbd)."""
