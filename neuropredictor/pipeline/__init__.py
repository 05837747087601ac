"""The data path of one run, as library calls (`neuropredictor.schedule` runs them shard after shard and
finalizes the store, the Prefect flows as tasks):

    validate(config)              model loads, layers resolve, corpus reachable: before anything is written
    plan(config)                  validate, then create the Zarr store (or reopen it to resume)
    extract_shard(config, shard)  read -> decode/preprocess -> forward + reduce -> write rows -> commit

    replicas.py     one model replica per device, reused across shards (get_runner)
    planning.py     validate, plan, the store's identity, what the plan changed
    extraction.py   extract_shard, with the background writer
    readahead.py    the next shard's reader, started while the current one ends
"""

from neuropredictor.pipeline.extraction import extract_shard
from neuropredictor.pipeline.planning import (check_output, identity, plan, plan_messages, planned_shards,
                                              validate)
from neuropredictor.pipeline.replicas import Runner, check_device, get_runner, release_runners

__all__ = ["Runner", "check_device", "check_output", "extract_shard", "get_runner", "identity", "plan",
           "plan_messages", "planned_shards", "release_runners", "validate"]
