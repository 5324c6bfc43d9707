"""Edge tuning (MIET): a feature server that sends one gathered map per sample, and the edge client.

Server: `thrifty serve` (thrifty.serve.app, engine); client: thrifty.serve.client; wire format: protocol.
"""

from thrifty.serve.protocol import RemoteError


__all__ = ["RemoteError"]
