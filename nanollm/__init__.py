"""nanollm: a minimal, from-scratch LLM training pipeline (pretrain -> SFT -> RM -> PPO)."""
__version__ = "0.1.0"
