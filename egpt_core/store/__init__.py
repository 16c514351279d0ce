"""The hidden-state store (DESIGN.md §3.4): manifest-committed parquet + safetensors shards on any
fsspec URL, readable with plain pyarrow + safetensors.

Layout under a store URL::

    manifest.json                      commit point: meta, committed shards (+ sha256), counts
    pairs/shard-<name>.parquet         one row per pair (PAIR_SCHEMA)
    tensors/shard-<name>.safetensors   drafter, target [sum L, D] packed unpadded; offsets [n+1]
    target_lm_head.safetensors         weight [V, D]
    features/<key>.safetensors         cached event features
"""

from egpt_core.store.manifest import (
    DEFINING_FIELDS,
    PAIR_COLUMNS,
    PAIR_SCHEMA,
    POSITION_CONVENTION,
    SCHEMA_VERSION,
    shard_name,
)
from egpt_core.store.reader import (
    PairDataset,
    PairRows,
    ShardData,
    ShardGroupedSampler,
    StoreReader,
    collate_pairs,
)
from egpt_core.store.research_import import import_research, research_pair_id
from egpt_core.store.writer import NON_FINITE, ShardInfo, StoreWriter, committed_inputs

__all__ = [
    "DEFINING_FIELDS",
    "NON_FINITE",
    "PAIR_COLUMNS",
    "PAIR_SCHEMA",
    "POSITION_CONVENTION",
    "SCHEMA_VERSION",
    "PairDataset",
    "PairRows",
    "ShardData",
    "ShardGroupedSampler",
    "ShardInfo",
    "StoreReader",
    "StoreWriter",
    "collate_pairs",
    "committed_inputs",
    "import_research",
    "research_pair_id",
    "shard_name",
]
