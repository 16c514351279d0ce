"""The one train/validation split by scene, shared by adapter training, L6 and evaluation.

Scenes are ranked by a seeded hash of their id and the first round(val_fraction * n) go to
validation: the ranking of a scene never depends on list order or on other stores, so a train
store, its re-extracted (retf) copy and an evaluation of it agree on the validation scenes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from egpt_core.errors import ConfigError


def scene_unit(scene_id: str, seed: int) -> float:
    """A seeded uniform number in [0, 1) for a scene id."""
    h = hashlib.sha1(f"{seed}:{scene_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_scenes(scene_ids: Iterable[str], val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(train scenes, val scenes); no scene on both sides, each side non-empty."""
    scenes = sorted(set(scene_ids))
    if len(scenes) < 2:
        raise ConfigError(f"a validation split by scene needs >= 2 scenes, found {len(scenes)}; "
                          "give a separate validation store")
    ranked = sorted(scenes, key=lambda s: scene_unit(s, seed))
    n_val = min(len(scenes) - 1, max(1, round(val_fraction * len(scenes))))
    val = set(ranked[:n_val])
    return set(scenes) - val, val
