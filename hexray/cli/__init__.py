"""The `hexray` command: argument parsing and rich rendering only."""
