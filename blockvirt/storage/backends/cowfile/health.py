"""Whether a volume's layers are whole, found without opening them: the API and metrics ask at
every look, so a volume whose layer rows or files are gone shows as failed (with the reason)
instead of failing the listing that includes it."""

from __future__ import annotations

import os
from collections.abc import Iterable

from blockvirt.storage.backends.cowfile.layer import layer_paths
from blockvirt.storage.backends.cowfile.state import FileState


def inspect(st: FileState, head: str, others: Iterable[str]) -> tuple[int, str | None]:
    """(depth of `head`'s chain, what is wrong with it or with the chains of `others`, or
    None). Each layer is looked at once; open layers are whole (their files are open)."""
    seen: set[str] = set()
    depth = 0
    problem: str | None = None
    for i, top in enumerate([head, *others]):
        cur: str | None = top
        while cur is not None and cur not in seen:
            seen.add(cur)
            rec = st.catalog.layer(cur)
            if rec is None:
                problem = problem or f"layer {cur} is missing from the catalog"
                break
            if i == 0:
                depth += 1
            if problem is None and st.layers.get(cur) is None:
                pool = st.catalog.pool(rec.pool)
                for path in layer_paths(pool.path if pool is not None else "", cur):
                    if not os.path.exists(path):
                        problem = f"layer {cur}: {os.path.basename(path)} is missing from pool {rec.pool}"
                        break
            cur = rec.parent
        if i == 0 and cur is not None and problem is None:  # came back to a layer of its own chain
            problem = f"the chain of layer {head} has a cycle"
    return depth, problem
