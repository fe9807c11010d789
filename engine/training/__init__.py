"""The composition root of a training run: its context, the components built from config, the loop.

* ``context``: ``RunContext`` (rank, groups, device) and the device choice;
* ``process``: the default process group, topology and groups of a launched rank;
* ``assembly``: model, step runner, optimizer, tokenizer and datasets from the config;
* ``trainer``: the training loop (steps, evaluation, metrics, checkpoints through ``engine.checkpoint``);
* ``rollback``: automatic rollback on loss spikes, NaNs and fp16 scale collapse;
* ``runner``: one launched process end to end (discovery, watchdog, trainer, teardown);
* ``quickstart``: the whole recipe on the standard library's sources.
"""
