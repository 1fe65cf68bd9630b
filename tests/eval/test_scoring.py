import pytest
import torch

from sciassist.common import autocast
from sciassist.data.answers import ANSWER_PREFIX
from sciassist.eval import scoring
from sciassist.eval.questions import EvaluationError
from tests.eval.stubs import make_stub, question, record

# -----------------------------------------------------------------------------
# letter scoring


def test_letter_scoring_picks_argmax_among_allowed_letters_only():
    # no " L" merges: every letter is " " + L, the " " is shared and goes into the prompt,
    # so each letter is a single scored token. After " ", E is by far the most likely, but
    # the question only has A-C.
    tok, model = make_stub({}, {"A": 1.0, "B": 3.0, "C": 2.0, "D": 5.0, "E": 9.0}, merged_letters=())
    shared, continuations = scoring.letter_continuations(tok, ANSWER_PREFIX, 3)
    assert shared == [tok.ids["The correct answer is"], tok.ids[" "]]
    assert continuations == [[tok.ids["A"]], [tok.ids["B"]], [tok.ids["C"]]]
    probs = scoring.letter_probabilities(model, tok, [question()], [3])[0]
    expected = scoring.softmax([1.0, 3.0, 2.0])  # softmax over the allowed letters' logits
    assert probs == pytest.approx(expected, abs=1e-6)
    assert scoring.argmax(probs) == 1
    assert model.calls == 1  # all single-token letters: one forward pass for the batch


def test_multi_token_letter_continuation_sums_log_probs():
    # " A" is one token; " B" and " C" are " " followed by the letter
    tok, model = make_stub({" A": 1.0, " ": 2.0, "E": 4.0}, {"B": 6.0, "C": 0.5, "D": 3.0})
    shared, continuations = scoring.letter_continuations(tok, ANSWER_PREFIX, 3)
    assert shared == [tok.ids["The correct answer is"]]
    assert continuations == [[tok.ids[" A"]], [tok.ids[" "], tok.ids["B"]], [tok.ids[" "], tok.ids["C"]]]
    first = torch.log_softmax(model.table[tok.ids["The correct answer is"]], 0)
    second = torch.log_softmax(model.table[tok.ids[" "]], 0)
    scores = [first[tok.ids[" A"]].item(),
              first[tok.ids[" "]].item() + second[tok.ids["B"]].item(),
              first[tok.ids[" "]].item() + second[tok.ids["C"]].item()]
    probs = scoring.letter_probabilities(model, tok, [question(), question()], [3, 2])
    assert probs[0] == pytest.approx(scoring.softmax(scores), abs=1e-6)
    assert probs[1] == pytest.approx(scoring.softmax(scores[:2]), abs=1e-6)
    assert sum(probs[0]) == pytest.approx(1.0)
    assert scoring.argmax(probs[0]) == 1  # P(" ")P(B | " ") beats P(" A") although " A" is one token


def tiny_gpt(tokenizer, seed):
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                          n_kv_head=2, n_embd=32))
    model.init_weights()
    return model


def lively_gpt(tokenizer, seed):
    """tiny_gpt with weights large enough that its next-token distributions are far from flat."""
    model = tiny_gpt(tokenizer, seed)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
        for block in model.transformer.h:
            block.mlp.c_proj.weight.normal_(0, 0.2)
    return model.eval()


def test_letter_scoring_is_independent_of_batching(tiny_tokenizer):
    model = lively_gpt(tiny_tokenizer, 0)
    prompts = [[{"role": "user", "content": "Which is a mammal?" + " x" * n}] for n in (0, 7, 3, 12)]
    counts = [2, 3, 4, 5]
    one = scoring.letter_probabilities(model, tiny_tokenizer, prompts, counts, batch_size=1)
    many = scoring.letter_probabilities(model, tiny_tokenizer, prompts, counts, batch_size=4)
    for a, b, k in zip(one, many, counts, strict=True):
        assert len(a) == k
        assert a == pytest.approx(b, abs=1e-5)  # right padding must not change anything


def test_generate_answers_match_unbatched_engine(tiny_tokenizer):
    from nanochat.engine import Engine
    model = tiny_gpt(tiny_tokenizer, 1)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    model.eval()
    texts = ("Hello", "Which of these states is farthest north?", "Hi there")
    prompts = [[{"role": "user", "content": text}] for text in texts]
    texts = scoring.generate_answers(model, tiny_tokenizer, prompts, max_tokens=6, batch_size=2)
    engine = Engine(model, tiny_tokenizer)
    for prompt, text in zip(prompts, texts, strict=True):
        ids = tiny_tokenizer.render_for_completion(prompt)
        sequences, _ = engine.generate_batch(ids, num_samples=1, max_tokens=6, temperature=0.0)
        assert text == tiny_tokenizer.decode(sequences[0][len(ids):])


def test_answer_prefix_check(tiny_tokenizer):
    records = [record("1", 1), record("2", 0)]
    records[1]["messages"][-1]["content"] = "Answer: A"
    assert scoring.answer_prefix_check(tiny_tokenizer, records) == (1, 2)


# -----------------------------------------------------------------------------
# choice scoring (--scoring choice)


def test_choice_scoring_sums_the_whole_answer_line():
    # after " ": A is likelier than B (letter scoring says option 0), but option 1's text C
    # is much likelier than option 0's text B, so the whole line " B. C" wins
    tok, model = make_stub({}, {"A": 2.0, "B": 1.0, "C": 4.0}, merged_letters=())
    shared, continuations = scoring.choice_continuations(tok, ANSWER_PREFIX, ["B", "C"])
    ids = tok.ids
    assert shared == [ids["The correct answer is"], ids[" "]]
    assert continuations == [[ids["A"], ids["."], ids[" "], ids["B"]], [ids["B"], ids["."], ids[" "], ids["C"]]]
    lp = {t: torch.log_softmax(model.table[ids[t]], 0) for t in ("The correct answer is", " ", "A", "B", ".")}
    expected = [lp[" "][ids["A"]] + lp["A"][ids["."]] + lp["."][ids[" "]] + lp[" "][ids["B"]],
                lp[" "][ids["B"]] + lp["B"][ids["."]] + lp["."][ids[" "]] + lp[" "][ids["C"]]]
    scores = scoring.choice_scores(model, tok, [question()], [["B", "C"]])[0]
    assert scores == pytest.approx([e.item() for e in expected], abs=1e-5)
    assert scoring.argmax(scores) == 1
    assert scoring.argmax(scoring.letter_probabilities(model, tok, [question()], [2])[0]) == 0


def test_choice_scoring_needs_the_answer_prefix():
    tok, model = make_stub({}, {"A": 2.0, "B": 1.0, "C": 4.0}, merged_letters=())
    with pytest.raises(EvaluationError, match="answer prefix"):
        scoring.choice_scores(model, tok, [question()], [["B", "C"]], answer_prefix="")


# the text_first answer format ("The correct answer is <option> (L).")


def test_choice_scoring_text_first_scores_text_then_letter():
    tok, model = make_stub({}, {"A": 2.0, "B": 1.0, "C": 4.0}, merged_letters=())
    ids = tok.ids
    shared, continuations = scoring.choice_continuations(tok, ANSWER_PREFIX, ["B", "C"], "text_first")
    assert shared == [ids["The correct answer is"], ids[" "]]
    # " B (A)." -> B, " ", "?" for "(", A, "?" for ")", "."
    assert continuations[0] == [ids["B"], ids[" "], ids["?"], ids["A"], ids["?"], ids["."]]
    assert continuations[1] == [ids["C"], ids[" "], ids["?"], ids["B"], ids["?"], ids["."]]
    scores = scoring.choice_scores(model, tok, [question()], [["B", "C"]], answer_format="text_first")[0]
    assert scoring.argmax(scores) == 1  # C after the prefix's " " outweighs B


def test_answer_prefix_check_for_choice_scoring(tiny_tokenizer):
    from sciassist.data.scienceqa import FormatOptions, format_record
    raw = {"pid": "1", "question": "Which is hot?", "choices": ["ice", "steam"], "answer": 1, "hint": ""}
    text_first = format_record(raw, FormatOptions(answer_format="text_first"))
    assert scoring.answer_prefix_check(tiny_tokenizer, [text_first], scoring="choice",
                                       answer_format="text_first") == (1, 1)
    assert scoring.answer_prefix_check(tiny_tokenizer, [text_first], scoring="choice",
                                       answer_format="letter_first") == (0, 1)


# -----------------------------------------------------------------------------
# constrained answer lines (--constrain_answers)


def test_constrained_choice_follows_the_branching_tokens_not_the_sums():
    # both lines start with token 1; at the branch, token 2 (-0.5) beats token 4 (-0.9), so
    # greedy decoding is on line 0 for good, although line 1's whole sum is far higher
    continuations = [[1, 2, 3], [1, 4, 5]]
    token_scores = [[-0.1, -0.5, -3.0], [-0.1, -0.9, -0.1]]
    assert scoring.constrained_choice(continuations, token_scores) == 0
    assert scoring.argmax([sum(t) for t in token_scores]) == 1
    # three lines, two sharing their first token: 7 (-1.0) beats 6 (-2.0), then 9 beats 8
    assert scoring.constrained_choice([[7, 8], [7, 9, 1], [6]], [[-1.0, -3.0], [-1.0, -0.2, -9.0], [-2.0]]) == 1
    # a tie at the branch goes to the earlier option; a single option is itself
    assert scoring.constrained_choice([[3], [4]], [[-0.7], [-0.7]]) == 0
    assert scoring.constrained_choice([[5, 6]], [[-4.0, -4.0]]) == 0


def test_constrained_choice_equals_token_by_token_constrained_greedy_decoding(tiny_tokenizer):
    # the reference: decode with the real model one token at a time, keeping only the next
    # tokens of the answer lines still possible, and taking the likeliest of them
    model = lively_gpt(tiny_tokenizer, 3)
    questions = [(["cat", "dog", "cow"], "text_first"), (["red fox", "red hen"], "text_first"),
                 (["north", "south", "east", "west"], "letter_first"), (["ice", "steam"], "letter_first")]
    picked = []
    for choices, answer_format in questions:
        prompt = [{"role": "user", "content": "Which one? " + " ".join(choices)}]
        shared, lines = scoring.choice_continuations(tiny_tokenizer, ANSWER_PREFIX, choices, answer_format)
        context = tiny_tokenizer.render_for_completion(prompt) + shared
        alive, reply = list(range(len(lines))), []
        while len(alive) > 1:
            with torch.no_grad():
                logits = model(torch.tensor([context + reply]))[0, -1]
            allowed = {lines[j][len(reply)] for j in alive}
            token = max(sorted(allowed), key=lambda t: logits[t].item())
            reply.append(token)
            alive = [j for j in alive if lines[j][len(reply) - 1] == token]
        continuations, token_scores = scoring.choice_token_scores(model, tiny_tokenizer, [prompt], [choices],
                                                                  answer_format=answer_format)
        assert scoring.constrained_choice(continuations[0], token_scores[0]) == alive[0]
        picked.append(alive[0])
    assert len(set(picked)) > 1  # the weights are not so flat that every question picks option 0


def test_text_continuation_scores_split_as_lm_eval_and_sum_the_continuation(tiny_tokenizer, monkeypatch):
    """Plain text, no chat template: the continuation's tokens are those of context +
    continuation after the context's own encoding (a trailing space of the context moves to
    the continuation), and their log-probabilities are summed, as a direct forward computes.
    In fp32 (a CPU without native bf16), so batches of 1 and 4 agree to 1e-5 on any CPU."""
    import sciassist.common
    monkeypatch.setattr(sciassist.common, "native_bf16", lambda device: False)
    model = lively_gpt(tiny_tokenizer, 2)
    with torch.no_grad():  # attention that does something: the context matters
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.2)
    contexts = ["Question: Which is a mammal?\nAnswer:", "Question: What melts ice? "]
    options = [[" a whale", " a trout that swims"], ["heat", "cold air"]]
    sums = scoring.text_continuation_scores(model, tiny_tokenizer, contexts, options, batch_size=1)
    batched = scoring.text_continuation_scores(model, tiny_tokenizer, contexts, options, batch_size=4)
    assert [x for row in sums for x in row] == pytest.approx([x for row in batched for x in row], abs=1e-5)
    for context, choices, got in zip(contexts, options, sums, strict=True):
        stripped = context.rstrip()
        context_ids = tiny_tokenizer.encode(stripped)
        for choice, value in zip(choices, got, strict=True):
            whole = tiny_tokenizer.encode(context + choice)
            tail = whole[len(context_ids):]
            with torch.no_grad(), autocast(model.get_device()):  # the precision scoring computes in
                log_probs = model(torch.tensor([whole[:-1]]))[0].float().log_softmax(-1)
            expected = sum(log_probs[len(context_ids) - 1 + t, token].item() for t, token in enumerate(tail))
            assert value == pytest.approx(expected, abs=1e-4)
    with_bos = scoring.text_continuation_scores(model, tiny_tokenizer, contexts[:1], options[:1], bos=True)
    assert with_bos[0] != pytest.approx(sums[0], abs=1e-3)  # <|bos|> first changes what the model sees
    with pytest.raises(EvaluationError, match="must not be empty"):
        scoring.text_continuation_scores(model, tiny_tokenizer, ["  "], [["x"]])
