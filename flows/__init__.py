"""Prefect flows composing tasks/: one per stage (extract, train_adapter, train_lora, evaluate), the
end-to-end `pipeline` and the scheduled `nightly_reextract`. Flow parameters are the pydantic
config models of egpt_core.config; deployments/prefect.yaml deploys them on the `gpu` pool.
`extract_ray` (the `ray` extra) runs the shard groups as Ray tasks instead (deployments/README.md §8)."""
