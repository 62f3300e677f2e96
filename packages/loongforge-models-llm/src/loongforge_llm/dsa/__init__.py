"""DeepSeek-V3.2 sparse attention (DSA): indexer, top-k selection, sparse attention, indexer losses.

Pure torch; an MLA attention module calls ``LightningIndexer`` -> ``select_topk`` (or the chunked
``indexer_topk``) -> ``sparse_mla_attention``, and trains the indexer with ``indexer_loss``.
"""

from .indexer import LightningIndexer, indexer_topk, lightning_indexer_scores
from .sparse_attention import sparse_mla_attention
from .topk import allowed_mask, select_topk, topk_to_mask

__all__ = [
    "LightningIndexer",
    "allowed_mask",
    "indexer_topk",
    "lightning_indexer_scores",
    "select_topk",
    "sparse_mla_attention",
    "topk_to_mask",
]
