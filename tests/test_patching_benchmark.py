"""benchmarks/patching.py: the FLOP budget stops training where it should, every held-out byte is
scored once, θ lands on the target patch length, and the whole quick pipeline runs on tiny settings."""

import dataclasses
import importlib.util
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT


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


def test_quick_pipeline_on_tiny_settings(shared_data):
    books = pb.load_books(shared_data / "text")
    assert len(books.test) == (shared_data / "text" / "katrine.txt").stat().st_size
    fixed = pb.build(pb.fixed_and_space_entries(TINY)[0].config, seed=0)
    per_step = TINY.batch_size * fixed.training_flops(TINY.seq_len)
    s = dataclasses.replace(TINY, budget_flops=4 * per_step, entropy_budget_flops=per_step)
    out = pb.run(s, books, peer=False, log=lambda line: None)
    assert set(out["entries"]) == {"fixed", "space", "space-attention", "entropy-global", "entropy-monotonic"}
    for name, figures in out["entries"].items():
        assert 0 < figures["bits_per_byte"] < 12, name
        assert figures["train_flops"] >= s.budget_flops - (name.startswith("entropy") and out["entropy_model"]["train_flops"])
        assert figures["generate_bytes_per_s"] > 0
    # 300 held-out bytes in windows of 64: four of 8 patches, one of 44 bytes in 6 (the last one short).
    assert out["entries"]["fixed"]["avg_patch_length"] == round(300 / (4 * 8 + 6), 3)
    assert out["best_margin_over_fixed"] == pytest.approx(
        out["entries"]["fixed"]["bits_per_byte"] - out["entries"][out["best_patched"]]["bits_per_byte"], abs=1e-4
    )
    json.dumps(out)  # one JSON object


def test_blt_peer_times_training_and_generation():
    pytest.importorskip("transformers", reason="benchmark-only peer (pip install -e '.[bench]')")
    windows = pb.sample_windows(pb.to_stream(TEXT), 8, TINY.seq_len, torch.Generator().manual_seed(0))
    out = pb.blt_peer(dataclasses.replace(TINY, peer_steps=1), windows, target_length=5.0)
    assert out["train_bytes_per_s"] > 0 and out["generate_bytes_per_s"] > 0
    assert out["avg_patch_length"] == pytest.approx(5.0, rel=0.05)
