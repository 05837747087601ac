"""Prefect flows and tasks: thin orchestration over `neuropredictor.pipeline` (plan -> shards -> finalize)."""
