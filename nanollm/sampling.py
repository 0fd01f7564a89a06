"""The decoding settings a user picks for generation (sample.py, chat.py), checked before any model is loaded.

What each one means is in nanollm/model.py: sample_next_token. Temperature scales the logits (0 = greedy argmax);
top-k keeps the k most likely tokens (Fan et al. 2018); top-p keeps the smallest set whose probability reaches p
(nucleus sampling, Holtzman et al. 2020). A value outside its range would sample nonsense or NaN, so it is refused.
"""
import math

from nanollm.configurator import UserError


def check_sampling(temperature, top_k, top_p, max_new_tokens, num_samples=1):
    """Raise a one-line UserError naming the first setting out of range; return None when all are valid."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature={temperature!r}: must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise UserError(f"top_k={top_k!r}: must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:  # top_p = 0 would keep no token at all: softmax over only -inf gives NaN
        raise UserError(f"top_p={top_p!r}: must be in (0, 1] (1 = off)")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens!r}: must be >= 1")
    if num_samples < 1:
        raise UserError(f"num_samples={num_samples!r}: must be >= 1")
