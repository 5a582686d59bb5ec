"""``python -m quantcache``: the same command line as the ``quantcache`` script."""

from .cli import entry

if __name__ == "__main__":
    entry()
