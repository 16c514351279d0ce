"""EventGPT -> Video-LLaVA speculative-decoding data pipeline: the plain library (no Prefect)."""
