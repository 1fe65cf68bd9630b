"""The peers' batching, written out for the benchmarks to time against ours.

padded_batches is nanochat's SFT batching: consecutive groups of `batch_size` conversations,
each group right-padded to its longest, in the order given. SciAssist's own padded mode
(--packing false) is sciassist.data.batching.arrange_step(packed=False), which arranges a whole
optimizer step's rows at once.
"""

from sciassist.data.batching import collate


def padded_batches(dataset, example_indices, batch_size, pad_id):
    """nanochat's SFT batching over `example_indices`: a list of collated dicts (as
    sciassist.data.batching.collate makes them), one per group of `batch_size` conversations."""
    example_indices = list(example_indices)
    return [collate(dataset, [[i] for i in example_indices[k:k + batch_size]], pad_id)
            for k in range(0, len(example_indices), batch_size)]
