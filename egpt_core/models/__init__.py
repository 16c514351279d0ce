"""EventGPT (drafter) and Video-LLaVA (target) model layer: loading, prompting, AR and TF passes."""

from egpt_core.models.loading import load_eventgpt, load_videollava
from egpt_core.models.positions import POSITION_CONVENTION, gather_rows, response_row_slice, tf_input_ids

__all__ = ["POSITION_CONVENTION", "gather_rows", "load_eventgpt", "load_videollava", "response_row_slice",
           "tf_input_ids"]
