"""The coordinator's dialogue model on the real offline SmolLM2: one token stream, one KV cache.

Every check that the cache is right compares it with a from-scratch prefill of the same tokens:
same token ids, next-token logits and keys/values within float rounding."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from orchestration.dialogue import ChatFormat, DialogueLLM, _looping
from streaming.errors import DuplexError

COMPLETE = ["What time is it?", "Can you tell me a joke?", "What's the weather like tomorrow?", "Please turn off the lights.",
            "I'd like to book a table for two.", "How do I boil an egg?", "Thanks, that's all.", "Who wrote Hamlet?",
            "Set a timer for ten minutes.", "What is the capital of France?", "Can you play some music?",
            "I need help with my homework.", "Where is the nearest pharmacy?", "How are you today?",
            "Tell me about the Roman Empire.", "What's two plus two?", "Remind me to call my mother tonight.",
            "Is it going to rain today?", "Good morning!", "I don't understand your answer."]
FRAGMENTS = ["I was wondering if you could", "and then the", "Can you tell me", "What is the", "I'd like to book a",
             "So my question is", "The thing is that", "How do I", "Could you please", "I think we should",
             "My favorite color is", "Let me tell you about", "It was a really", "When I went to the", "Because I need to",
             "Do you know if", "What I meant was", "I want to go to", "Tell me about the", "Yesterday I saw a"]


@pytest.fixture(scope="module")
def llm():
    torch.set_num_threads(1)
    from agent.models import resolver_for

    return resolver_for("").llm("llm:smollm2-135m")


@pytest.fixture
def dlg(llm):
    d = DialogueLLM(llm, auto_compact=False)
    yield d
    d.close()


def fresh(d: DialogueLLM):
    """Next-token logits and the KV cache of d.ids prefilled from scratch in one pass."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        logits = d._run(cache, list(d.ids))[-1]
    return logits, cache


def assert_cache_is_fresh(d: DialogueLLM):
    logits, cache = fresh(d)
    assert d.cache.get_seq_length() == len(d.ids)
    torch.testing.assert_close(d._hist[len(d.ids) - 1], logits, atol=1e-3, rtol=1e-4)
    for (k1, v1, *_), (k2, v2, *_) in zip(d.cache, cache):
        torch.testing.assert_close(k1, k2, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v1, v2, atol=1e-4, rtol=1e-4)


def test_the_stream_is_the_models_chat_template(llm, dlg):
    assert dlg.fmt.user_prefix == "<|im_start|>user\n" and dlg.fmt.user_suffix == "<|im_end|>\n"
    dlg.user_words("Hi there")
    dlg.agent_said("Hello! How can I help?")
    dlg.user_words("What time is it?")
    msgs = [{"role": "system", "content": dlg.system_text}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "What time is it?"}]
    assert dlg.ids == llm.encode_chat(msgs, add_generation_prompt=False)[:-2]  # the user turn is still open
    dlg.end_user_turn()
    assert dlg.ids == llm.encode_chat(msgs, add_generation_prompt=False)
    assert_cache_is_fresh(dlg)


def test_hotwords_are_in_the_system_prompt(llm):
    d = DialogueLLM(llm, hotwords=["Asterisk", "PBX"], auto_compact=False)
    assert d.text.startswith("<|im_start|>system\n") and "Asterisk, PBX." in d.text.split("<|im_end|>")[0]


def test_a_template_that_rewrites_history_is_refused():
    class Tok:
        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            # only the last message is rendered: earlier turns vanish
            return f"<{msgs[-1]['role']}>{msgs[-1]['content']}" + ("<assistant>" if add_generation_prompt else "")

    with pytest.raises(DuplexError, match="cannot be served from one growing KV cache"):
        ChatFormat.of(Tok())


def test_incremental_prefill_equals_a_fresh_prefill(dlg):
    # stable words arrive one at a time; "wonder" -> "wondering" re-tokenises the boundary
    steps = ["I", "I was", "I was wonder", "I was wondering", "I was wondering if you", "I was wondering if you could tell me",
             "I was wondering if you could tell me the time?"]
    counts = [dlg.user_words(s) for s in steps]
    assert counts[2] == 1 and counts[3] == 1  # the changed token is replaced, nothing before it
    assert counts[-1] <= 4  # at the end of the turn only the last words are left
    assert dlg.tokenizer.decode(dlg.ids[dlg._turns[-1].body:]) == steps[-1]
    assert_cache_is_fresh(dlg)
    # the stable text may also be revised or shrink: the cache follows
    assert dlg.user_words("I was wondering if you could tell me") == 1  # only re-runs the new last token
    assert_cache_is_fresh(dlg)
    assert dlg.user_words("I was wondering if you could tell me the weather") == 2
    assert_cache_is_fresh(dlg)
    assert dlg.user_words("I was wondering if you could tell me the weather") == 0


def test_eot_separates_complete_turns_from_fragments(dlg):
    # measured on these 20 + 20 (SmolLM2-135M fp32, the default system prompt): p_eot on complete
    # punctuated turns min 2.1e-4 / p50 0.27 vs fragments max 3.0e-5 / p50 3.4e-10 (AUC 1.0); but
    # when the recogniser puts a full stop after a fragment p_eot overlaps (p50 0.011, max 0.22,
    # AUC 0.82). p_sentence_end, read before the final punctuation, does not care: complete p50
    # 0.37 vs fragments p50 1.8e-4, AUC 0.995 with or without punctuation
    base = dlg.mark()

    def scores(text, *more):
        dlg.rollback_to(base)
        return [dlg.eot_scores(t) for t in (text, *more)]  # the later texts extend the first by a token

    complete = [scores(t)[0] for t in COMPLETE]
    bare, stopped = zip(*(scores(t, t + ".") for t in FRAGMENTS))
    p_c, p_f = [s.p_eot for s in complete], [s.p_eot for s in bare]
    assert min(p_c) > 3 * max(p_f)  # measured: 7x
    e_c, e_f = [s.p_sentence_end for s in complete], [s.p_sentence_end for s in bare + stopped]
    assert sorted(e_c)[10] > 300 * sorted(e_f)[20]  # medians, measured 2000x
    auc = sum(c > f for c in e_c for f in e_f) / (len(e_c) * len(e_f))
    assert auc >= 0.97  # measured 0.995
    # the sentence-end reading ignores the recogniser's punctuation
    for s, f in zip(bare, stopped):
        assert s.p_sentence_end == pytest.approx(f.p_sentence_end, rel=1e-3)
    assert dlg.eot_probability() == stopped[-1].p_eot  # read from the cached state, no new work


def test_reply_streams_from_the_cache_and_stays_in_it(dlg):
    dlg.user_words("What is the capital of")
    dlg.user_words("What is the capital of France?")
    reply = dlg.respond(max_new_tokens=20)
    pieces = list(reply)
    assert "Paris" in "".join(pieces) and reply.stop_reason == "eos"
    s = reply.stats
    assert s.close_tokens == len(dlg._user_suffix + dlg._asst_prefix) and s.words_tokens == 2 and s.ttft_ms > 0 and s.decode_tok_s > 0
    assert dlg.open_role is None and dlg.text.endswith(reply.text + "<|im_end|>\n")
    assert_cache_is_fresh(dlg)
    dlg.user_words("And of Italy?")
    assert "Rome" in dlg.respond(max_new_tokens=20).result()


def test_cancellation_stops_within_one_token(dlg):
    dlg.user_words("Tell me a long story about a dragon.")
    stop = threading.Event()
    calls = []
    run = dlg._run
    dlg._run = lambda *a, **k: (calls.append(stop.is_set()), run(*a, **k))[1]
    reply = dlg.respond(max_new_tokens=50, should_stop=stop.is_set)
    got = []
    for piece in reply:
        got.append(piece)
        if len(got) == 3:
            stop.set()
    dlg._run = run
    assert reply.stop_reason == "cancelled" and len(got) == 3 and reply.stats.new_tokens == 3
    assert not any(calls)  # not one model call after the stop was asked for
    assert dlg.open_role == "assistant"  # the cut reply waits for truncate or rollback


def test_runaway_cap_and_empty_reply(dlg, caplog):
    dlg.user_words("Tell me a long story about a dragon.")
    reply = dlg.respond(max_new_tokens=4)
    reply.result()
    assert reply.stop_reason == "cap" and reply.stats.new_tokens == 4
    assert dlg.open_role is None and dlg.ids[-2:] == dlg._asst_suffix  # closed: the next turn can follow
    assert_cache_is_fresh(dlg)
    # a model that ends its turn at once: the fallback is said and kept as the agent's turn
    dlg.user_words("Hmm.")
    pick = dlg._pick
    dlg._pick = lambda logits: dlg.eot_id
    with caplog.at_level("WARNING"):
        reply = dlg.respond()
        text = reply.result()
    dlg._pick = pick
    assert text == dlg.config.fallback_reply and reply.stop_reason == "empty" and "empty reply" in caplog.text
    assert dlg.text.endswith("<|im_start|>assistant\n" + dlg.config.fallback_reply + "<|im_end|>\n")
    assert_cache_is_fresh(dlg)


def test_repetition_loops_are_detected():
    assert _looping([5] * 12) and not _looping([5] * 11)
    assert _looping([1, 2, 3, 4] * 3) and _looping([9, 8] + [7, 6, 5, 4, 3] * 3)
    assert not _looping(list(range(40)))


def test_a_speculative_reply_is_dropped_when_the_user_goes_on(dlg):
    dlg.user_words("What time is it")
    before = dlg.eot_scores()
    reply = dlg.respond(max_new_tokens=10)
    next(reply), next(reply)  # speculation under way
    assert reply.drop() == 0  # a plain crop: nothing recomputed
    assert dlg.open_role == "user" and dlg.eot_scores() == before
    dlg.user_words("What time is it in Tokyo?")
    assert_cache_is_fresh(dlg)
    ref = DialogueLLM(dlg.llm, auto_compact=False)
    ref.user_words("What time is it in Tokyo?")
    assert ref.ids == dlg.ids
    # calling into the dialogue while a reply is suspended closes that reply first
    reply = dlg.respond(max_new_tokens=10)
    next(reply)
    dlg.rollback_to(reply.mark)
    assert reply.stop_reason == "closed" and dlg.ids == ref.ids


def _truncated_reference(d: DialogueLLM, question: str, agent_text: str, after: str | None = None) -> DialogueLLM:
    ref = DialogueLLM(d.llm, auto_compact=False)
    ref.user_words(question)
    ref.agent_said(agent_text)
    if after:
        ref.user_words(after)
    return ref


def test_barge_in_truncates_the_agent_turn_to_what_was_heard(dlg):
    q = "Tell me about the Roman Empire."
    dlg.user_words(q)
    reply = dlg.respond(max_new_tokens=12)
    reply.result()
    heard = " ".join(reply.text.split()[:4])
    dlg.user_words("Wait,")  # the user barges in: their words are already in the cache
    dlg.user_words("Wait, stop")
    dlg.truncate_agent_turn(heard)
    ref = _truncated_reference(dlg, q, heard + " … [interrupted]", "Wait, stop")
    assert dlg.ids == ref.ids and dlg.open_role == "user"
    assert_cache_is_fresh(dlg)
    torch.testing.assert_close(dlg._hist[len(dlg.ids) - 1], ref._hist[len(ref.ids) - 1], atol=1e-3, rtol=1e-4)
    # and the next reply follows on from the cut turn
    dlg.user_words("Wait, stop. What year did it fall?")
    assert dlg.respond(max_new_tokens=4).result()


def test_truncating_a_cancelled_reply_and_hearing_nothing(dlg):
    q = "Tell me a long story about a dragon."
    dlg.user_words(q)
    reply = dlg.respond(max_new_tokens=30)
    words = []
    for piece in reply:
        words.append(piece)
        if len(words) == 6:
            reply.close()  # the coordinator stops it at the barge-in
    heard = " ".join("".join(words).split()[:2])
    dlg.truncate_agent_turn(heard)
    assert dlg.ids == _truncated_reference(dlg, q, heard + " … [interrupted]").ids
    assert_cache_is_fresh(dlg)
    dlg.user_words("Sorry, go on.")
    dlg.respond(max_new_tokens=3).result()
    dlg.truncate_agent_turn("", marker="[interrupted]")  # cut before any audio played
    assert dlg.text.endswith("<|im_start|>assistant\n… [interrupted]<|im_end|>\n")
    assert_cache_is_fresh(dlg)


def test_monologue_keeps_its_most_recent_part(llm):
    d = DialogueLLM(llm, max_user_tokens=32, auto_compact=False)
    words = ("one two three four five six seven eight nine ten " * 8).split()
    counts = [d.user_words(" ".join(words[:i])) for i in range(1, len(words) + 1, 4)]
    body = d.ids[d._turns[-1].body:]
    assert len(body) <= 32 and d.tokenizer.decode(body).startswith("…")
    assert sorted(counts)[len(counts) // 2] <= 5  # most calls still extend the cache by a few tokens
    assert_cache_is_fresh(d)


def _talk(d: DialogueLLM, i: int) -> None:
    d.user_words(f"This is message number {i}. Please remember that my favourite number is {i}.")
    d.agent_said(f"Noted: your favourite number is {i}. Anything else I can help you with today?")


def test_background_compaction_keeps_the_bound_and_the_model_answers(llm):
    d = DialogueLLM(llm, max_context=256, compact_at=0.6, keep_fraction=0.4, max_new_tokens=12)
    try:
        for i in range(8):
            _talk(d, i)
            assert len(d.ids) <= d.max_context
        d.poll(wait=True)
        d.user_words("What is my favourite number?")
        assert d.stats.compactions >= 2 and d.stats.foreground_compactions == 0
        assert "message number 0." not in d.text and "message number 7." in d.text
        assert_cache_is_fresh(d)
        reply = d.respond()
        assert reply.result().strip() and len(d.ids) <= d.max_context
    finally:
        d.close()


def test_compaction_built_on_another_thread_swaps_in_at_once(llm):
    d = DialogueLLM(llm, max_context=400, keep_turns=2, auto_compact=False)
    for i in range(3):
        _talk(d, i)
    plan = d.plan_compaction()
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("p", d.prepare_compaction(plan)))
    worker.start()
    d.user_words("And now")  # the conversation goes on meanwhile
    mark = d.mark()
    d.user_words("And now a question?")
    worker.join()
    assert d.swap_in(result["p"])
    assert d.stats.last_swap_replay_tokens == len(d.ids) - d._turns[-1].start  # just the open turn
    assert "message number 0." not in d.text and d.text.count("message number") == 1
    assert_cache_is_fresh(d)
    # a mark from before the swap still works (translated to the new stream)
    d.rollback_to(mark)
    assert d.tokenizer.decode(d.ids[d._turns[-1].body:]) == "And now"
    assert_cache_is_fresh(d)
    # with nothing added since the plan the swap is a pointer swap
    _talk(d, 3)
    _talk(d, 4)
    prepared = d.prepare_compaction(d.plan_compaction())
    t0 = time.perf_counter()
    assert d.swap_in(prepared)
    assert time.perf_counter() - t0 < 0.01 and d.stats.last_swap_replay_tokens == 0
    # a plan overtaken by an edit of the turns it covers is refused
    _talk(d, 5)
    _talk(d, 6)
    prepared = d.prepare_compaction(d.plan_compaction())
    d.truncate_agent_turn("Noted: your favourite")
    assert not d.swap_in(prepared) and d.stats.stale_compactions == 1
    assert_cache_is_fresh(d)


def test_final_words_and_the_closing_go_in_one_pass(dlg):
    dlg.user_words("What is the capital")
    calls = []
    run = dlg._run
    dlg._run = lambda *a, **k: (calls.append(len(a[1])), run(*a, **k))[1]
    reply = dlg.respond(max_new_tokens=1, text="What is the capital of Italy?")
    dlg._run = run
    assert calls == [3 + reply.stats.close_tokens] and reply.stats.words_tokens == 3  # " of", " Italy", "?"
    assert dlg.tokenizer.decode(list(reply.mark.ids[dlg._turns[-2].body:])) == "What is the capital of Italy?"
    reply.result()
    assert reply.drop() == 0  # the mark's logits came from the same pass: back to the open turn by a crop
    assert dlg.eot_scores() == dlg.eot_scores("What is the capital of Italy?")
    assert_cache_is_fresh(dlg)


def test_compaction_can_summarise_what_it_drops(llm):
    d = DialogueLLM(llm, keep_turns=2, summarize=True, auto_compact=False)
    d.user_words("Hi, my name is Anna and I live in Berlin.")
    d.agent_said("Nice to meet you, Anna! How can I help?")
    _talk(d, 1)
    assert d.compact_now() and d.summary  # (SmolLM2-135M's summaries are loose: off by default)
    assert "Earlier in this conversation: " + d.summary in d.text.split("<|im_end|>")[0]
    assert "Anna" not in d.text.split("<|im_end|>", 1)[1]  # the turns themselves are gone
    assert_cache_is_fresh(d)


def test_int8_weights_keep_the_end_of_turn_readings_of_fp32_and_decode_faster(llm):
    """The shipped precision (w8: int8 weights, bf16 activations) reads the same turn ends as fp32:
    every complete sentence and fragment falls on the same side of the shipped thresholds (its
    speed is measured by bench models)."""
    import copy

    from orchestration.llm import ChatLLM
    from orchestration.turns import TurnConfig
    from streaming.models.quantize import WeightInt8Linear, quantize_weight_int8, weight_int8_available

    if not weight_int8_available():
        pytest.skip("this torch has no _weight_int8pack_mm CPU kernel")
    w8 = ChatLLM(quantize_weight_int8(copy.deepcopy(llm.model)), llm.tokenizer, llm.source, "w8")
    assert sum(isinstance(m, WeightInt8Linear) for m in w8.model.modules()) == 30 * 7 + 1
    cfg = TurnConfig()
    readings = {}
    for name, model in (("fp32", llm), ("w8", w8)):
        d = DialogueLLM(model, auto_compact=False)
        readings[name] = [d.eot_scores(t).p_sentence_end for t in COMPLETE + FRAGMENTS]
        d.close()
    for text, p32, p8 in zip(COMPLETE + FRAGMENTS, readings["fp32"], readings["w8"]):
        for th in (cfg.unfinished_eot, cfg.respond_eot, cfg.speculate_eot, cfg.confident_eot):
            assert (p32 >= th) == (p8 >= th) or abs(p32 - p8) < 0.02, (text, th, p32, p8)

