"""Stand-in for a torchcodec wheel that cannot load here (see tests/serving/conftest.py)."""

raise ImportError("torchcodec is unavailable on this machine")
