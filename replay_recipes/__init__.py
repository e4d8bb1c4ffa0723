"""Recipes built on the bridge: whole jobs that use the library, the reference engine and the
trainer hooks together (torchtune's recipes are the model). Each recipe is a plain module driven
by a config; the library never imports them.

- ``replay_recipes.demo``: ``replay-bridge demo``, the whole trip on one machine.
- ``replay_recipes.grpo_megatron``: a GRPO step on megatron-core reading rollout shards
  (``python -m replay_recipes.grpo_megatron``).
"""
