"""sciassist.data.mixing: --mix's parsing and the share each source gets."""

import pytest

from sciassist.data.mixing import MixSource, mix_conversations, parse_mix


def test_parse_mix():
    assert parse_mix("general.jsonl:0.2, /a/b:c.jsonl:0.05") == [MixSource("general.jsonl", 0.2),
                                                                  MixSource("/a/b:c.jsonl", 0.05)]
    assert parse_mix("") == [] and parse_mix(None) == []
    for text, message in (("general.jsonl", "is not FILE:SHARE"), ("g.jsonl:x", "the share 'x' is not a number"),
                          ("g.jsonl:1.5", "between 0 and 1"), ("a:0.6,b:0.5", "add up to 1.1"),
                          ("a:0.1,a:0.2", "named more than once"), (":0.2", "is not FILE:SHARE")):
        with pytest.raises(ValueError, match=message):
            parse_mix(text)


def test_each_source_makes_up_its_share():
    main = [f"m{i}" for i in range(80)]
    small, large = [f"s{i}" for i in range(7)], [f"l{i}" for i in range(1000)]
    records, origins, counts = mix_conversations(main, [(small, 0.2), (large, 0.1)], seed=3)
    assert counts == [80, round(80 * 0.2 / 0.7), round(80 * 0.1 / 0.7)] == [80, 23, 11]
    assert len(records) == len(origins) == 114 and records[:80] == main
    assert [origins.count(k) for k in range(3)] == counts
    picked_small = records[80:103]
    assert sorted(set(picked_small)) == sorted(small) and picked_small[:7] == small  # 3 whole copies + 2 more
    picked_large = records[103:]
    assert len(set(picked_large)) == 11 and all(r.startswith("l") for r in picked_large)
    again = mix_conversations(main, [(small, 0.2), (large, 0.1)], seed=3)
    assert again[0] == records  # the same files and seed: the same set
    assert mix_conversations(main, [(small, 0.2), (large, 0.1)], seed=4)[0] != records
    with pytest.raises(ValueError, match="source 1 has no conversations"):
        mix_conversations(main, [([], 0.2)], seed=0)
