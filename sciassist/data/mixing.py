"""More conversation sources mixed into a training set, each as a share of the mix: the lever
against forgetting (e.g. ScienceQA plus a general chat set at 20%).

    --mix general.jsonl:0.2,more.jsonl:0.05

A source with share s among extra shares S (sum < 1) brings round(N * s / (1 - S))
conversations, N being the main set's size, so it makes up s of the training set: whole
copies of the source while it is too small, then a subset drawn with numpy's
default_rng([seed, source number]). The mix is a pure function of the files and the seed, so a
resumed run trains on the same set (the run's data fingerprint covers it).
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MixSource:
    path: str
    share: float


def parse_mix(text):
    """"a.jsonl:0.2,b.jsonl:0.05" -> [MixSource]; raises ValueError saying what is wrong."""
    sources = []
    for part in (p.strip() for p in str(text or "").split(",")):
        if not part:
            continue
        path, sep, share_text = part.rpartition(":")
        if not sep or not path:
            raise ValueError(f"{part!r} is not FILE:SHARE (e.g. general.jsonl:0.2)")
        try:
            share = float(share_text)
        except ValueError:
            raise ValueError(f"{part!r}: the share {share_text!r} is not a number") from None
        if not 0 < share < 1:
            raise ValueError(f"{part!r}: the share must be between 0 and 1 (a fraction of the training set)")
        sources.append(MixSource(path, share))
    total = sum(s.share for s in sources)
    if total >= 1:
        raise ValueError(f"the shares add up to {total:g}; they must leave room for the main data (< 1)")
    paths = [s.path for s in sources]
    if len(set(paths)) != len(paths):
        raise ValueError("a file is named more than once")
    return sources


def mix_conversations(main, extras, seed):
    """main: the main training records; extras: [(records, share)]. Returns (records, origins,
    counts): the mixed records (main first), each record's origin (0 = main, k = extras[k-1])
    and how many records each origin brought."""
    total_share = sum(share for _, share in extras)
    records, origins, counts = list(main), [0] * len(main), [len(main)]
    for k, (source, share) in enumerate(extras, 1):
        if not source:
            raise ValueError(f"mixed-in source {k} has no conversations")
        wanted = round(len(main) * share / (1 - total_share))
        copies, rest = divmod(wanted, len(source))
        picked = list(range(len(source))) * copies
        picked += sorted(np.random.default_rng([seed, k]).choice(len(source), size=rest, replace=False).tolist())
        records += [source[i] for i in picked]
        origins += [k] * len(picked)
        counts.append(len(picked))
    return records, origins, counts
