"""Stages 1-2: event features and paired hidden-state extraction."""

from egpt_core.extraction.run import ExtractSummary, load_models, pair_group, plan_pairs, run_extraction

__all__ = ["ExtractSummary", "load_models", "pair_group", "plan_pairs", "run_extraction"]
