"""Edge tuning (MIET): a feature server that sends one gathered map per sample, and the edge client.

Server: `thrifty serve` (thrifty.serve.app, engine); client: thrifty.features.remote; wire format: protocol.
"""

from thrifty.backbones.remote.protocol import RemoteError


__all__ = ["RemoteError"]
