"""The random models the benchmarks time: nanochat's init, then weights in the output
projections. nanochat's init zeroes them (every block starts as the identity); a trained
model never has them at zero, and a benchmark should not time a degenerate case."""

import torch

from nanochat.gpt import GPT


def random_gpt(config, device, seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    return model
