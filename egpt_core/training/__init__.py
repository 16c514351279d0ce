"""One training core for the adapter (stage 3a) and L6 LoRA (stage 3b) recipes.

torchtune-style components: the recipes (`egpt_core.adapters.trainer`, `egpt_core.lora.train`)
own their model, data and loss and read top-down as setup / resume / train_epoch /
checkpoint_epoch; everything both need lives here once:

* `dist` — the process-group context (single process or torchrun DDP),
* `schedule` — the warmup-cosine learning rate and the AdamW parameter groups,
* `state` — the run state whose ``after_epoch()`` decides best / patience / done,
* `checkpoint` — the one atomic, versioned checkpoint layout (``<run>/checkpoint/``),
* `curves` — metric sums (pooled over positions and ranks) and ``training_curves.png``,
* `similarity` — the one cosine / accept@tau definition, shared with evaluation.
"""
