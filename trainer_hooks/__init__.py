"""Trainer-side hooks that replay rollout routing (``trainer_hooks.megatron``)."""
