"""Known models, fetching them from PyPI, and text turned into token windows."""
