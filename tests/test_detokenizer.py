from transformers import AutoTokenizer

from fastgen.detokenizer import IncrementalDetokenizer, TextAccumulator, make_decode_fn

TEXT = "héllo wörld 東京 こんにちは 🙂 👍 naïve café — the engine schedules 42 requests"


def test_incremental_decoding_never_emits_broken_characters(llama_path):
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    ids = tokenizer(TEXT)["input_ids"]
    assert len(ids) > len(TEXT) // 4  # multi-byte characters are split over several tokens
    for split in (1, 5, len(ids) // 2):
        prompt, generated = ids[:split], ids[split:]
        detokenizer = IncrementalDetokenizer(make_decode_fn(tokenizer), prompt)
        deltas = [detokenizer.add(token) for token in generated]
        deltas.append(detokenizer.flush())
        assert all("\ufffd" not in d for d in deltas)
        expected = tokenizer.decode(ids)[len(tokenizer.decode(prompt)) :]
        assert "".join(deltas) == expected


def test_long_generation_keeps_a_short_window(llama_path):
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    ids = tokenizer(TEXT * 20)["input_ids"]
    detokenizer = IncrementalDetokenizer(make_decode_fn(tokenizer), ids[:3])
    text = "".join(detokenizer.add(t) for t in ids[3:]) + detokenizer.flush()
    assert text == tokenizer.decode(ids)[len(tokenizer.decode(ids[:3])) :]
    assert len(detokenizer._ids) < 64


def test_text_accumulator_holds_back_possible_stop_prefix():
    acc = TextAccumulator(["STOP"])
    assert acc.push("hello S") == ("hello ", False)
    assert acc.push("T") == ("", False)
    assert acc.push("x") == ("STx", False)  # not a stop after all
    assert acc.push(" ST") == (" ", False)
    assert acc.push("OP and more") == ("", True)
    assert acc.text == "hello STx "


def test_text_accumulator_final_flush_and_multiple_stops():
    acc = TextAccumulator(["\n\n", "END"])
    assert acc.push("a\n") == ("a", False)
    assert acc.push("b", final=True) == ("\nb", False)
    acc = TextAccumulator(["xyz", "yz"])
    assert acc.push("abxyz") == ("ab", True)  # the earliest match wins
