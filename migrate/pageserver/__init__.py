"""The page-server: wire protocol (docs/protocol.md), asyncio server, client sink."""
