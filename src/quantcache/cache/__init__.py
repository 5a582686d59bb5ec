"""The calibrated quantizer and the DynamicCache subclass that holds one conversation with it.

Importing the package imports both, so ``KVQuantizer.new_cache`` always knows its cache class.
"""

from quantcache.cache import cache as _cache  # noqa: F401  (sets KVQuantizer.cache_class)
