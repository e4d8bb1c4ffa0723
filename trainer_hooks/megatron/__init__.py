"""Megatron-core router replay hook: rollout routing replayed exactly in every parallel layout."""
