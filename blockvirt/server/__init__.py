"""asyncio adapter: listeners, sessions, dispatch, export registry, service lifecycle."""
