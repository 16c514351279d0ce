"""Shared pieces of the stage-5 tests: model sessions over the session's tiny fixtures, per-pair
inputs, and a drafter session that IS the target (self-speculation)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def scenes(fixtures_dir):
    from egpt_core.data import load_scenes

    return load_scenes(str(fixtures_dir / "dataset"))


@pytest.fixture(scope="session")
def questions(fixtures_dir):
    from egpt_core.data import load_questions

    return load_questions(str(fixtures_dir / "dataset" / "questions.json"))


@pytest.fixture(scope="session")
def pair_inputs(drafter, target, scenes, questions):
    """pair_inputs(scene_index, question_index) -> PairInputs (memoised)."""
    from egpt_core.config import EventRenderConfig
    from egpt_core.data import read_video_frames
    from egpt_core.extraction.features import scene_event_frames
    from egpt_core.speculative import PairInputs

    memo = {}

    def make(si: int = 0, qi: int = 0):
        if (si, qi) not in memo:
            scene, q = scenes[si], questions[qi]
            frames = read_video_frames(scene.video_path, 8)
            t_ids, pv = target.prepare(q, frames)
            ev = drafter.preprocess_frames(scene_event_frames(scene, EventRenderConfig()))
            memo[(si, qi)] = PairInputs(drafter.prompt_ids(q), ev, t_ids, pv)
        return memo[(si, qi)]

    return make


@pytest.fixture(scope="session")
def sessions(drafter, target):
    """(TargetSession, DrafterSession) on the CPU."""
    from egpt_core.speculative.sessions import DrafterSession, Lane, TargetSession

    return TargetSession(target, Lane("target", "cpu")), DrafterSession(drafter, Lane("drafter", "cpu"))


@pytest.fixture(scope="session")
def eos(target):
    return target.tokenizer.eos_token_id


class TargetAsDrafter:
    """A drafter session that is the target itself (its own cache): self-speculation, where every
    draft read through the target's LM head is the target's own greedy token."""

    def __init__(self, target, lane, video_pixel_values, target_prompt_ids):
        from egpt_core.speculative.sessions import TargetSession

        self.inner = TargetSession(target, lane)
        self.lane = lane
        self.pv, self.ids = video_pixel_values, target_prompt_ids
        self.drafter = type("D", (), {"double_adaptor": False})()

    @property
    def cache_len(self) -> int:
        return self.inner.cache_len

    def encode_events(self, pixel_values):
        return self.inner.encode_video(self.pv)

    def prefill(self, prompt_ids, features) -> torch.Tensor:
        """The target's own prompt (not the drafter's) -> its last position's row (row 0)."""
        self.inner.prefill(self.ids[:-1], features)
        return self.inner.forward(self.ids[-1:]).hidden[0]

    def feed(self, token_ids) -> torch.Tensor:
        return self.inner.forward(list(token_ids)).hidden

    def crop(self, length: int) -> None:
        self.inner.crop(length)


@pytest.fixture(scope="session")
def target_as_drafter(target):
    def make(inputs):
        from egpt_core.speculative.sessions import Lane

        return TargetAsDrafter(target, Lane("drafter", "cpu"), inputs.video_pixel_values, inputs.target_prompt_ids)

    return make
