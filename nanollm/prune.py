"""Global unstructured magnitude pruning of the Linear layers, with masks that survive fine-tuning.

Teaches: the smallest |w| over all Linear layers together are set to zero (one global threshold, so layers with many
small weights lose more; Han et al. 2015, "Learning both Weights and Connections"), a mask applied as a
parametrization (the model always sees weight · mask, so an optimizer step cannot revive a pruned weight), a short
fine-tune to recover (Zhu & Gupta 2017), and making the zeros permanent. Embeddings and LayerNorms are not pruned.
    python -m nanollm.prune --out_dir=out --sparsity=0.5 --finetune_iters=50 --pruned_dir=out-pruned
"""
import os
import shutil
import sys

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from nanollm.checkpoint import atomic_save
from nanollm.loader import load_model
from nanollm.model import architecture_args


class Mask(nn.Module):
    """The parametrization weight -> weight · mask. The optimizer updates the original weight; its gradient at a
    pruned position is multiplied by 0 too, and whatever the original holds there, the model sees 0."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)  # bool, True = kept

    def forward(self, weight):
        return weight * self.mask


def prunable_linears(model):
    """(name, Linear) for every nn.Linear whose weight is not an embedding's (the tied lm_head is wte)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and (parametrize.is_parametrized(module, "weight") or id(module.weight) not in embedding_weights)]


@torch.no_grad()
def magnitude_prune(model, sparsity):
    """Zero the round(sparsity · N) smallest-magnitude weights among all N prunable Linear weights, globally,
    and keep a mask on each layer. Calling it again with a higher sparsity prunes further (zeros rank lowest)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    layers = prunable_linears(model)
    if not layers:
        raise ValueError("the model has no prunable Linear layer")
    scores = torch.cat([module.weight.abs().flatten().float() for _, module in layers])  # (N,) all weights
    n_pruned = round(sparsity * scores.numel())
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_pruned:
        # exactly n_pruned positions, ties broken by topk (a threshold |w| <= t could take more on ties)
        pruned[torch.topk(scores, n_pruned, largest=False).indices] = True
    offset = 0
    for _, module in layers:
        count = module.weight.numel()
        mask = ~pruned[offset:offset + count].view_as(module.weight)  # (out, in), True = kept
        offset += count
        if parametrize.is_parametrized(module, "weight"):
            module.parametrizations.weight[0].mask.copy_(mask)
        else:
            parametrize.register_parametrization(module, "weight", Mask(mask))
        module.parametrizations.weight.original.mul_(mask)  # the stored value is 0 too (permanent == masked)
    return n_pruned


@torch.no_grad()
def sparsity_report(model):
    """{"layers": {name: (zeros, total)}, "zeros", "total", "sparsity"} over the prunable Linear weights,
    and "model_sparsity": zeros over every parameter of the model."""
    layers = {name: (int((module.weight == 0).sum()), module.weight.numel())
              for name, module in prunable_linears(model)}
    zeros = sum(z for z, _ in layers.values())
    total = sum(t for _, t in layers.values())
    n_parameters = sum(p.numel() for p in model.parameters())  # the original of a masked weight counts once
    return {"layers": layers, "zeros": zeros, "total": total, "sparsity": zeros / max(total, 1),
            "model_sparsity": zeros / max(n_parameters, 1)}


def format_sparsity(report):
    lines = [f"  {name:<32s}{zeros / total:>8.1%}  ({zeros:,} / {total:,})"
             for name, (zeros, total) in report["layers"].items()]
    lines.append(f"  {'all prunable Linear weights':<32s}{report['sparsity']:>8.1%}  "
                 f"({report['zeros']:,} / {report['total']:,}); whole model {report['model_sparsity']:.1%}")
    return "\n".join(lines)


def make_permanent(model):
    """Remove the masks: each weight becomes a plain Parameter holding its zeros (state_dict names as before)."""
    for _, module in prunable_linears(model):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def finetune(model, data_dir, iters, learning_rate=3e-4, batch_size=16, block_size=None, seed=0, device="cpu"):
    """A short next-token fine-tune on data_dir's train split (AdamW, constant learning rate); masks keep the
    pruned weights at zero. Returns the losses. Build no optimizer before pruning: the masked originals are new."""
    from nanollm.data import get_batch

    block_size = block_size or model.config.block_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(iters):
        x, y = get_batch(data_dir, "train", batch_size, block_size, seed, step, 0, device)  # (B, T) each
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def save_pruned(model, path, source, sparsity):
    """A checkpoint that nanollm.loader (sample.py, chat.py, evaluate.py) loads like any other; no optimizer."""
    make_permanent(model)
    atomic_save({"model": model.state_dict(), "model_args": architecture_args(model.config),
                 "config": {"model_type": "gpt", "pruned_from": source, "sparsity": sparsity}, "stage": "pruned"},
                path)


def main(argv=None):
    from nanollm.configurator import UserError, configure_command

    settings = dict(
        out_dir="out",  # the model to prune: a folder with ckpt.pt and tokenizer.model
        sparsity=0.5,  # fraction of the Linear weights set to zero
        finetune_iters=0,  # fine-tune steps after pruning (the masks are kept)
        learning_rate=3e-4,  # of the fine-tune
        data_dir=os.path.join("data", "world"),  # prepared data for the fine-tune
        pruned_dir="out-pruned",  # writes ckpt.pt and tokenizer.model here
    )
    words = configure_command("python -m nanollm.prune", settings, sys.argv[1:] if argv is None else argv,
                              renamed={"ckpt_dir": "out_dir"})
    if words:
        raise UserError(f"command line: unexpected argument '{words[0]}' (use --key=value)")
    out_dir, pruned_dir, sparsity = settings["out_dir"], settings["pruned_dir"], settings["sparsity"]
    model = load_model(out_dir).model
    magnitude_prune(model, sparsity)
    if settings["finetune_iters"]:
        losses = finetune(model, settings["data_dir"], settings["finetune_iters"], settings["learning_rate"])
        print(f"[nanollm] fine-tuned {settings['finetune_iters']} steps with masks: "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(format_sparsity(sparsity_report(model)))
    os.makedirs(pruned_dir, exist_ok=True)
    save_pruned(model, os.path.join(pruned_dir, "ckpt.pt"), out_dir, sparsity)
    tokenizer = os.path.join(out_dir, "tokenizer.model")
    if os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(pruned_dir, "tokenizer.model"))
    print(f"[nanollm] wrote {pruned_dir}/ckpt.pt; compare: python evaluate.py --out_dir={out_dir},{pruned_dir}")


if __name__ == "__main__":
    main()
