"""benchmarks/patching.py: the FLOP budget stops training where it should, every held-out byte is
scored once (a BPE model's bits are divided by the bytes its tokens decode to), θ lands on the
target patch length, the noised test set changes 5% of the words under a seed, the Chinese split is
disjoint, and the whole quick pipeline runs on tiny settings."""

import dataclasses
import importlib.util
import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT
from multibyte.bpe import train_bpe


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("patching_benchmark", REPO_ROOT / "benchmarks" / "patching.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


pb = _load_benchmark()

# Smaller than QUICK: global 32 (2 channels per byte slot of a 16-byte patch), local 16.
TINY = dataclasses.replace(
    pb.QUICK,
    seq_len=64,
    batch_size=4,
    budget_flops=1.0,  # set per test
    entropy_budget_flops=1.0,
    global_width=32,
    global_layers=1,
    local_width=16,
    local_layers=1,
    entropy_width=16,
    entropy_layers=1,
    warmup_steps=1,
    probe_batches=2,
    calibration_windows=8,
    eval_bytes=300,
    eval_batch_size=2,
    prompt_bytes=8,
    generate_bytes=8,
)

TEXT = (
    b"It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    b"must be in want of a wife. However little known the feelings or views of such a man may be "
    b"on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    b"surrounding families, that he is considered as the rightful property of some one or other "
    b"of their daughters.\n\n"
) * 8


def test_training_stops_at_the_first_step_that_reaches_the_budget():
    entry = pb.fixed_and_space_entries(TINY)[0]
    model = pb.build(entry.config, seed=0)
    before = model.head.weight.detach().clone()
    # Fixed patches: every row has seq_len / P units, so a step costs B x training_flops(T).
    per_step = TINY.batch_size * model.training_flops(TINY.seq_len, TINY.seq_len // TINY.fixed_patch)
    result = pb.train_to_budget(model, pb.to_stream(TEXT), TINY, budget=2.5 * per_step)
    assert result.steps == 3
    assert result.flops == pytest.approx(3 * per_step)
    assert result.bytes == 3 * TINY.batch_size * TINY.seq_len
    assert result.units * TINY.fixed_patch == result.bytes
    assert not model.training
    assert not torch.equal(before, model.head.weight)


def test_dynamic_patches_are_charged_per_row_units():
    entry = pb.fixed_and_space_entries(TINY)[1]  # space
    model = pb.build(entry.config, seed=0)
    stream = pb.to_stream(TEXT)
    result = pb.train_to_budget(model, stream, TINY, budget=1.0)  # one step
    assert result.steps == 1
    # The same window the loop drew, its space-patch starts counted independently per row.
    tokens = pb.sample_windows(stream, TINY.batch_size, TINY.seq_len, torch.Generator().manual_seed(TINY.seed))
    starts = model.unit_starts(tokens)[0]
    units = starts.sum(dim=1).tolist()
    assert result.units == sum(units)
    assert result.flops == pytest.approx(sum(model.training_flops(TINY.seq_len, k) for k in units))
    assert result.computed_flops == pytest.approx(len(units) * model.training_flops(TINY.seq_len, max(units)))
    assert min(units) < max(units) or result.computed_flops == pytest.approx(result.flops)


@pytest.mark.parametrize("name", ["fixed", "space"])
def test_score_counts_every_byte_once(name):
    entry = {e.name: e for e in pb.fixed_and_space_entries(TINY)}[name]
    model = pb.build(entry.config, seed=0).eval()
    data = TEXT[:300]  # windows of 64: four full, one of 44
    result = pb.score(model, pb.to_stream(data), TINY.seq_len, batch_size=3)
    tokens = torch.tensor(list(data))
    nll = 0.0
    with torch.no_grad():
        for begin in range(0, len(data), TINY.seq_len):
            window = tokens[None, begin : begin + TINY.seq_len]
            nll += float(F.cross_entropy(model(window)[0], window[0], reduction="sum"))
    assert result.num_bytes == 300
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / 300, rel=1e-5)


def test_entropy_threshold_lands_on_the_target_patch_length():
    config = pb.entropy_model_config(TINY)
    entry = pb.entropy_entries(TINY, config, "concat")[0]
    model = pb.build(entry.config, seed=0)
    model.patchers[0].model.load_state_dict(pb.build(config, seed=1).state_dict())
    windows = pb.sample_windows(pb.to_stream(TEXT), 8, TINY.seq_len, torch.Generator().manual_seed(0))
    theta, measured = pb.calibrate_entropy(model, windows, target=5.0)
    assert measured == pytest.approx(5.0, rel=0.02)
    assert float(model.patchers[0].threshold) == theta
    assert pb.mean_patch_length(model, windows) == measured


def test_missing_books_skip_with_one_json_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["patching.py", "--quick", "--data", str(tmp_path)])
    pb.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("skipped:") and "katrine.txt" in lines[0]
    assert json.loads(lines[-1])["skipped"]


def test_missing_chinese_text_skips_with_one_json_line(shared_data, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "tang_poems.txt"
    argv = ["patching.py", "--quick", "--data", str(shared_data / "text"), "--zh-data", str(missing)]
    monkeypatch.setattr(sys, "argv", argv)
    pb.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("skipped:") and str(missing) in lines[0]
    assert json.loads(lines[-1])["skipped"]


def test_chinese_text_that_is_not_utf8_is_one_clear_error(shared_data, tmp_path, monkeypatch, capsys):
    latin1 = tmp_path / "poems.txt"
    latin1.write_bytes("caf\u00e9\n\n".encode("latin-1") * 50)
    argv = ["patching.py", "--quick", "--data", str(shared_data / "text"), "--zh-data", str(latin1)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        pb.main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--zh-data" in error and str(latin1) in error and "not UTF-8" in error


# ---- the noised English test set --------------------------------------------------------------


def _words(data: bytes) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(rb"[A-Za-z]+", data)]


def test_noise_changes_five_percent_of_words_under_a_seed():
    data = TEXT + "caf\u00e9 na\u00efve \u00e6on".encode("latin-1") + b" 1999, see\tsee-saw\n"
    noised = pb.noise_words(data, 0.05, seed=7)
    spans = _words(data)
    assert len(noised) == len(data) and _words(noised) == spans  # every word keeps its place
    inside = {i for begin, end in spans for i in range(begin, end)}
    assert all(noised[i] == data[i] for i in range(len(data)) if i not in inside)  # Latin-1, digits, spaces
    changed = [(data[b:e], noised[b:e]) for b, e in spans if data[b:e] != noised[b:e]]
    assert len(changed) == round(0.05 * len(spans)) > 10
    flips = [pair for pair in changed if pair[0].lower() == pair[1].lower()]
    swaps = [pair for pair in changed if pair[0].lower() != pair[1].lower()]
    assert swaps
    # Even odds between the two: words that could have been swapped got case flips too.
    assert any(any(a != b for a, b in zip(old, old[1:])) for old, _ in flips)
    for old, new in flips:  # exactly one letter changed case
        assert sum(a != b for a, b in zip(old, new)) == 1
    for old, new in swaps:  # exactly two adjacent letters exchanged
        at = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
        assert len(at) == 2 and at[1] == at[0] + 1 and (old[at[0]], old[at[1]]) == (new[at[1]], new[at[0]])
    assert pb.noise_words(data, 0.05, seed=7) == noised
    assert pb.noise_words(data, 0.05, seed=8) != noised
    assert pb.noise_words(data, 0.0, seed=7) == data
    with pytest.raises(ValueError, match="noise rate"):
        pb.noise_words(data, 1.5, seed=7)


def test_noise_on_the_held_out_book(shared_data):
    book = (shared_data / "text" / "katrine.txt").read_bytes()  # Latin-1
    noised = pb.noise_words(book, 0.05, seed=3)
    spans = _words(book)
    changed = sum(book[b:e] != noised[b:e] for b, e in spans)
    assert changed == round(0.05 * len(spans))
    assert [i for i, byte in enumerate(book) if byte >= 0x80] == [i for i, byte in enumerate(noised) if byte >= 0x80]


# ---- the Chinese split -----------------------------------------------------------------------


def test_chinese_split_is_disjoint_and_cuts_between_poems():
    poems = [f"詩{i}\n作者\n{'春風' * (i % 7 + 1)}。\n".encode() for i in range(40)]
    data = b"\n".join(poems)
    train, test = pb.split_by_position(data, 0.1, "poems.txt")
    assert train + test == data  # every byte in exactly one part, in order
    assert train.endswith(b"\n\n") and not test.startswith(b"\n")
    assert len(train) >= 0.9 * len(data) > len(train) - 200
    assert test.decode("utf-8").count("作者") == len(test.split(b"\n\n"))  # whole poems only
    with pytest.raises(ValueError, match="poems.txt: no blank line"):
        pb.split_by_position(b"one poem\nno blank line\n", 0.1, "poems.txt")


def test_chinese_corpus_split(shared_data):
    corpora = pb.load_corpora(shared_data / "text", shared_data / "text_zh" / "tang_poems.txt", 0.1)
    whole = (shared_data / "text_zh" / "tang_poems.txt").read_bytes()
    assert corpora.zh_train + corpora.zh_test == whole
    assert 0.09 < len(corpora.zh_test) / len(whole) <= 0.1
    corpora.zh_train.decode("utf-8"), corpora.zh_test.decode("utf-8")  # no character cut
    s = dataclasses.replace(TINY, eval_bytes=1001)
    chinese = pb.eval_sets(s, corpora)[2].data
    assert corpora.zh_test.startswith(chinese) and 998 < len(chinese) <= 1001
    chinese.decode("utf-8")
    both = pb.training_corpora(corpora, dataclasses.replace(TINY, train_bytes=None))["en+zh"]
    assert both.text == corpora.books.train + corpora.zh_train


# ---- the BPE entry ---------------------------------------------------------------------------


def _tiny_bpe(data: bytes):
    tokenizer = train_bpe([data], vocab_size=300)
    stream = pb.to_stream(data, tokenizer)
    target = pb.flops_per_byte(pb.fixed_and_space_entries(TINY)[0].config)
    config = pb.bpe_config(TINY, tokenizer.vocab_size, stream.bytes_per_symbol, target)
    return tokenizer, stream, config


def test_bpe_bits_per_byte_are_over_the_bytes_its_tokens_decode_to():
    data = TEXT[:700] + "na\u00efve \u00e6on".encode("latin-1")  # not UTF-8: byte tokens
    tokenizer, stream, config = _tiny_bpe(data)
    ids = stream.symbols.tolist()
    assert stream.num_bytes == len(data) == int(tokenizer.token_byte_lengths()[ids].sum())
    assert len(ids) < len(data) / 1.5  # tokens, not bytes
    model = pb.build(config, seed=0).eval()
    window = config.max_seq_len
    result = pb.score(model, stream, window, batch_size=3)
    nll, scored = 0.0, b""
    with torch.no_grad():
        for begin in range(0, len(ids), window):
            tokens = stream.symbols[None, begin : begin + window]
            nll += float(F.cross_entropy(model(tokens)[0], tokens[0], reduction="sum"))
            scored += tokenizer.decode(tokens[0].tolist())
    assert scored == data  # every byte once
    assert result.num_bytes == len(data)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / len(data), rel=1e-5)
    assert result.bits_per_byte < nll / math.log(2) / len(ids)  # not bits per token


def test_a_tokenizer_that_loses_bytes_is_refused():
    class DropsLastByte:
        def encode(self, data: bytes) -> list[int]:
            return list(data[:-1])

        def decode(self, ids: list[int]) -> bytes:
            return bytes(ids)

    with pytest.raises(ValueError, match="does not round-trip"):
        pb.to_stream(b"abc", DropsLastByte())


def test_bpe_depth_matches_the_fixed_models_flops_per_byte():
    fixed = pb.build(pb.fixed_and_space_entries(pb.FULL)[0].config, seed=0)
    target = fixed.training_flops(pb.FULL.seq_len) / pb.FULL.seq_len
    bytes_per_token = 3.6
    config = pb.bpe_config(pb.FULL, 4096, bytes_per_token, target)
    assert config.vocab_size == 4096 and config.num_stages == 1
    assert config.max_seq_len == round(pb.FULL.seq_len / bytes_per_token)  # about seq_len bytes of context

    def ratio(layers):
        candidate = dataclasses.replace(config, stages=[dataclasses.replace(config.stages[0], n_layers=layers)])
        model = pb.build(candidate, seed=0)  # a real model, not the meta one bpe_config counts on
        return model.training_flops(config.max_seq_len) / (config.max_seq_len * bytes_per_token) / target

    chosen = config.stages[0].n_layers
    ratios = {layers: ratio(layers) for layers in range(1, pb.FULL.bpe_max_layers + 1)}
    assert min(ratios, key=lambda n: abs(math.log(ratios[n]))) == chosen
    assert 0.75 < ratios[chosen] < 1.33


# ---- the whole pipeline ----------------------------------------------------------------------


def test_quick_pipeline_on_tiny_settings(shared_data):
    corpora = pb.load_corpora(shared_data / "text", shared_data / "text_zh" / "tang_poems.txt", 0.1)
    assert len(corpora.books.test) == (shared_data / "text" / "katrine.txt").stat().st_size
    fixed = pb.build(pb.fixed_and_space_entries(TINY)[0].config, seed=0)
    per_step = TINY.batch_size * fixed.training_flops(TINY.seq_len)
    s = dataclasses.replace(TINY, budget_flops=3 * per_step, entropy_budget_flops=per_step, train_bytes=1 << 16)
    extra = pb.Entry("fixed-4", pb.two_stages(s, "fixed", 4), "MEGABYTE, P = 4")  # the hook for more entries
    out = pb.run(s, corpora, peer=False, en_zh_training=True, extra_entries=[extra], log=lambda line: None)
    english = {"fixed", "space", "space-attention", "entropy-global", "entropy-monotonic", "bpe", "bpe-tok-en+zh",
               "fixed-4"}
    mode = "global" if (out["entries"]["entropy-global"]["tests"]["english"]["bits_per_byte"]
                        <= out["entries"]["entropy-monotonic"]["tests"]["english"]["bits_per_byte"]) else "monotonic"
    space = "space" if out["space_pooling_winner"] == "concat" else "space-attention"
    both = {"fixed/en+zh", f"{space}/en+zh", f"entropy-{mode}/en+zh", "bpe/en+zh"}
    assert set(out["entries"]) == english | both
    sets = out["data"]["test_sets"]
    assert list(sets) == ["english", "english-noised", "chinese"]
    assert sets["english"]["bytes"] == sets["english-noised"]["bytes"] == 300
    for name, figures in out["entries"].items():
        assert figures["trained_on"] == ("en+zh" if name in both else "en")
        charged = figures["train_flops"] + (out["entropy_model" + name[len(name.split("/")[0]):]]["train_flops"]
                                            if name.startswith("entropy") else 0)
        assert charged >= s.budget_flops, name
        for set_name, test in figures["tests"].items():
            assert 0 < test["bits_per_byte"] < 40, (name, set_name)
            assert test["bytes_scored"] == sets[set_name]["bytes"], (name, set_name)  # every byte once
            assert test["generate_bytes_per_s"] > 0
        if figures["vocabulary"] == "bytes":
            assert all(test["symbols_per_byte"] == 1 for test in figures["tests"].values())
        else:
            assert figures["tests"]["english"]["symbols_per_byte"] < 0.7
            assert figures["window"] < s.seq_len
    # The English tokenizer meets Chinese one byte a token; one that saw Chinese merges characters.
    assert out["tokenizers"]["bpe-en"]["tokens_per_byte"]["chinese"] > 0.99
    assert out["tokenizers"]["bpe-en+zh"]["tokens_per_byte"]["chinese"] < 0.9
    bpe_chinese = out["entries"]["bpe"]["tests"]["chinese"]
    assert bpe_chinese["symbols_per_byte"] == out["tokenizers"]["bpe-en"]["tokens_per_byte"]["chinese"]
    # 300 held-out bytes in windows of 64: four of 8 patches, one of 44 bytes in 6 (the last one short).
    assert out["entries"]["fixed"]["tests"]["english"]["avg_patch_length"] == round(300 / (4 * 8 + 6), 3)
    english_bpb = {name: out["entries"][name]["tests"]["english"]["bits_per_byte"] for name in english}
    best_margin = english_bpb["fixed"] - english_bpb[out["best_patched"]]
    assert out["best_margin_over_fixed"] == pytest.approx(best_margin, abs=1e-4)
    # who_wins: per training text and test set, read back from the entries.
    for corpus, names in (("en", english), ("en+zh", both)):
        for set_name in sets:
            table = out["who_wins"][corpus][set_name]
            bpb = {name: out["entries"][name]["tests"][set_name]["bits_per_byte"] for name in names}
            ranking = [name for name, _ in table["ranking"]]  # (ties may come in either order)
            assert set(ranking) == names and [bpb[name] for name in ranking] == sorted(bpb.values())
            assert table["best"] == ranking[0] and table["next"] == ranking[1]
            assert table["margin_over_next"] == pytest.approx(bpb[ranking[1]] - bpb[ranking[0]], abs=1e-4)
            byte_best = min(bpb[n] for n in names if not n.startswith("bpe"))
            assert bpb[table["best_byte"]] == byte_best and not table["best_byte"].startswith("bpe")
            assert table["bpe_minus_best_byte"] == {
                n: pytest.approx(bpb[n] - byte_best, abs=1e-4) for n in names if n.startswith("bpe")
            }
    json.dumps(out)  # one JSON object


def test_blt_peer_times_training_and_generation():
    pytest.importorskip("transformers", reason="benchmark-only peer (pip install -e '.[bench]')")
    windows = pb.sample_windows(pb.to_stream(TEXT), 8, TINY.seq_len, torch.Generator().manual_seed(0))
    out = pb.blt_peer(dataclasses.replace(TINY, peer_steps=1), windows, target_length=5.0)
    assert out["train_bytes_per_s"] > 0 and out["generate_bytes_per_s"] > 0
    assert out["avg_patch_length"] == pytest.approx(5.0, rel=0.05)
