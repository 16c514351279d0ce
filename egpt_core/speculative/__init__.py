"""Stage 5: real speculative decoding - the drafter drafts, the target verifies (DESIGN.md §4.4).

Public API::

    run_speculative(cfg: SpeculateConfig, progress=None) -> SpeculateResult   # one configuration
    speculative_generate(target, drafter, head, inputs, gamma, ...) -> Generation  # one pair
    target_greedy(target, inputs, max_new_tokens, eos_id) -> Generation           # the baseline
"""

from egpt_core.speculative.drafting import DraftHead
from egpt_core.speculative.loop import (
           Generation,
           PairInputs,
           RoundRecord,
           speculative_generate,
           target_greedy,
)
from egpt_core.speculative.run import SpeculateResult, run_speculative

__all__ = ["DraftHead", "Generation", "PairInputs", "RoundRecord", "SpeculateResult", "run_speculative",
           "speculative_generate", "target_greedy"]
