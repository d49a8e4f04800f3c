"""Invariants of the one hierarchical model, for every architecture it can be configured as."""

import math

import pytest
import torch

from multibyte.config import PRESETS, ModelConfig, StackConfig
from architectures import ARCHITECTURES
from multibyte.model import HierarchicalByteModel
from multibyte.training import masked_byte_nll


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_no_logit_sees_its_own_or_later_bytes(name):
    # 13 bytes with P = 4: three full patches and a padded partial one, so every kind of border
    # (inside a patch, patch to patch, real to padding) is crossed.
    torch.manual_seed(0)
    config = ARCHITECTURES[name]
    model = HierarchicalByteModel(config).eval()
    tokens = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        reference = model(tokens)
        for t in range(tokens.shape[1]):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 97) % 256
            logits = model(changed)
            # Positions <= t predict bytes <= t from bytes < t: byte t is not among their inputs.
            torch.testing.assert_close(logits[:, : t + 1], reference[:, : t + 1], rtol=0, atol=1e-6)
            if t + 1 < tokens.shape[1]:
                # ...and some later position must react, or the test proves nothing. (Without a
                # local model, bytes of the same patch cannot see each other: the next patch does.)
                assert (logits[:, t + 1 :] - reference[:, t + 1 :]).abs().max() > 1e-4, f"byte {t} unused"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_tiny_model_overfits_one_batch(name):
    torch.manual_seed(0)
    model = HierarchicalByteModel(ARCHITECTURES[name])
    # Random bytes, byte 0 included on purpose: it is an ordinary byte to learn, not padding.
    tokens = torch.randint(0, 256, (2, 48))
    tokens[:, ::7] = 0
    lengths = torch.full((2,), 48)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        nll, count = masked_byte_nll(model(tokens), tokens, lengths)
        loss = nll / count
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bpb = loss.item() / math.log(2)
        if bpb < 0.5:
            break
    # The first byte of each row has no context; everything else must be memorised.
    assert bpb < 0.5, f"{name} did not overfit: {bpb:.3f} bits/byte"


def test_padding_to_a_patch_multiple_does_not_change_real_logits():
    torch.manual_seed(0)
    model = HierarchicalByteModel(ARCHITECTURES["megabyte"]).eval()
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        full = model(tokens)
        short = model(tokens[:, :13])  # padded internally to 16
    assert short.shape == (1, 13, 256)
    torch.testing.assert_close(short, full[:, :13], rtol=0, atol=1e-6)


def test_masked_nll_counts_only_real_bytes():
    # Uniform logits: every real byte costs exactly ln 256 nats, i.e. 8 bits.
    logits = torch.zeros(2, 5, 256)
    tokens = torch.randint(0, 256, (2, 5))
    nll, count = masked_byte_nll(logits, tokens, torch.tensor([5, 2]))
    assert count.item() == 7
    assert nll.item() == pytest.approx(7 * math.log(256), rel=1e-6)


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ModelConfig(patch_size=3, max_seq_len=12, global_model=StackConfig(d_model=16, n_heads=2))
    with pytest.raises(ValueError, match="must divide d_model"):
        StackConfig(d_model=30, n_heads=4)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    config = ModelConfig.from_name(name)
    with torch.device("meta"):  # shapes only: GPU-sized presets would need gigabytes
        model = HierarchicalByteModel(config)
    assert model.num_parameters() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_attention_equals_fused_kernel(dtype):
    from multibyte.mixers.attention import explicit_causal_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 12, 16, dtype=dtype) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(explicit_causal_attention(q, k, v).float(), expected, rtol=0, atol=tolerance)
