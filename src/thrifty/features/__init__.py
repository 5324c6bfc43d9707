"""Features of a frozen backbone as data: named taps, the on-disk feature cache (extract once, train many)."""

from thrifty.features.cache import CacheMismatchError, CorruptCacheError, FeatureCache, file_checksum
from thrifty.features.pipeline import cached_task, extract_features, roles_for
from thrifty.features.reader import CachedTapDataset
from thrifty.features.taps import MASK, POOLED, block_tap, canonical_taps, extract_taps


__all__ = [
    "MASK",
    "POOLED",
    "CacheMismatchError",
    "CachedTapDataset",
    "CorruptCacheError",
    "FeatureCache",
    "block_tap",
    "cached_task",
    "canonical_taps",
    "extract_features",
    "extract_taps",
    "file_checksum",
    "roles_for",
]
