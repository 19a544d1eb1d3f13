"""HexRay's engine: recording (torch + TransformerLens) and replay (numpy only)."""

__version__ = "0.1.0"
