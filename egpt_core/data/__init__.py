"""Dataset manifests (instruction JSON, questions), video frame sampling, synthetic datasets."""

from egpt_core.data.dataset import Pair, Scene, build_pairs, load_questions, load_scenes
from egpt_core.data.synthetic import write_synthetic_dataset
from egpt_core.data.video import read_video_frames, sample_frame_indices

__all__ = [
    "Pair",
    "Scene",
    "build_pairs",
    "load_questions",
    "load_scenes",
    "read_video_frames",
    "sample_frame_indices",
    "write_synthetic_dataset",
]
