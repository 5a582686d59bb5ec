"""``python -m quantcache``: the same command line as the ``quantcache`` script."""

from quantcache.cli import entry

if __name__ == "__main__":
    entry()
