"""What storage tells the rest of the process, in one typed interface.

The volume manager and the pool manager call these; the service wires listeners (QoS, the
NBD server) when it builds the process. Storage imports none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from blockvirt.storage.pools import PoolSettings


class StorageEvents(Protocol):
    def volume_deleted(self, volume: str) -> None: ...

    def volume_moved(self, volume: str, pool: str) -> None:
        """The volume's data now lives in `pool` (called inside the switch's drain)."""

    def pool_changed(self, pool: str) -> None:
        """A pool was created, deleted, or its settings changed."""

    def check_pool_settings(self, pool: str, settings: PoolSettings) -> None:
        """Refuse (CatalogError) settings a listener cannot honour, before they are stored."""

    async def disconnect(self, volume: str) -> None:
        """End every session on the volume's head cleanly (an edit must not run under them)."""

    async def evict(self, volume: str) -> None:
        """Cut every session on the volume's head at once, answering nothing more (this node
        no longer serves it: the client must reconnect to the node that does)."""

    def volume_settings_changed(self, volume: str) -> None:
        """Another node changed the volume's settings (QoS) in the storage they share: read
        them again."""


class NoEvents:
    """Nobody listens (tests and tools that use storage alone)."""

    def volume_deleted(self, volume: str) -> None:
        pass

    def volume_moved(self, volume: str, pool: str) -> None:
        pass

    def pool_changed(self, pool: str) -> None:
        pass

    def check_pool_settings(self, pool: str, settings: PoolSettings) -> None:
        pass

    async def disconnect(self, volume: str) -> None:
        pass

    async def evict(self, volume: str) -> None:
        pass

    def volume_settings_changed(self, volume: str) -> None:
        pass


class Fanout:
    """Several listeners, called in order."""

    def __init__(self, listeners: Sequence[StorageEvents]) -> None:
        self.listeners = list(listeners)

    def volume_deleted(self, volume: str) -> None:
        for x in self.listeners:
            x.volume_deleted(volume)

    def volume_moved(self, volume: str, pool: str) -> None:
        for x in self.listeners:
            x.volume_moved(volume, pool)

    def pool_changed(self, pool: str) -> None:
        for x in self.listeners:
            x.pool_changed(pool)

    def check_pool_settings(self, pool: str, settings: PoolSettings) -> None:
        for x in self.listeners:
            x.check_pool_settings(pool, settings)

    async def disconnect(self, volume: str) -> None:
        for x in self.listeners:
            await x.disconnect(volume)

    async def evict(self, volume: str) -> None:
        for x in self.listeners:
            await x.evict(volume)

    def volume_settings_changed(self, volume: str) -> None:
        for x in self.listeners:
            x.volume_settings_changed(volume)
