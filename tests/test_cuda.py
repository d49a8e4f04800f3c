"""What only a GPU can check: the CUDA paths agree with the CPU reference paths.

Every test is marked `cuda` and skipped without a CUDA device (`benchmarks/gpu_check.sh` runs
them with `-m cuda`): forward passes and the chunked loss on CUDA vs CPU, mamba-ssm's fused
kernels vs the reference chunked scan (when installed), cached decoding vs recompute on CUDA,
and the torch.compile'd / CUDA-graph decoding step vs eager decoding.
"""

import copy

import pytest
import torch

from architectures import ARCHITECTURES, build
from multibyte.chunked_loss import real_positions
from multibyte.model import HierarchicalByteModel
from multibyte.training import masked_byte_nll

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEXT = b"Hi, there!  A test: 42 bytes, two   spaces.\nNew line; ok." * 2
CUDA_ARCHITECTURES = ["megabyte", "vanilla", "mambabyte", "hybrid", "megabyte-3stage", "space", "entropy"]


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would round fp32 matmuls to 10 mantissa bits: compare true fp32 with the CPU."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def text_rows(*offsets: int, length: int = 40) -> torch.Tensor:
    return torch.tensor([list(TEXT[o : o + length]) for o in offsets])


def on_cuda(name: str) -> tuple[HierarchicalByteModel, HierarchicalByteModel]:
    cpu = build(name)
    return cpu, copy.deepcopy(cpu).cuda()


@pytest.mark.parametrize("name", CUDA_ARCHITECTURES)
def test_forward_on_cuda_matches_cpu(name):
    cpu, gpu = on_cuda(name)
    tokens = text_rows(0, 9)
    with torch.no_grad():
        torch.testing.assert_close(gpu(tokens.cuda()).cpu(), cpu(tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["megabyte", "mambabyte", "space"])
def test_chunked_loss_and_gradients_on_cuda_match_full_logits(name):
    _, gpu = on_cuda(name)
    gpu.train()
    tokens, lengths = text_rows(0, 5).cuda(), torch.tensor([40, 23], device="cuda")
    nll, count = masked_byte_nll(gpu(tokens), tokens, lengths)
    gpu.zero_grad()
    (nll / count).backward()
    expected = {n: p.grad.clone() for n, p in gpu.named_parameters() if p.grad is not None}
    gpu.zero_grad()
    chunked, chunked_count = gpu(tokens, loss_mask=real_positions(tokens, lengths))
    (chunked / chunked_count).backward()
    torch.testing.assert_close(chunked, nll, rtol=1e-5, atol=1e-4)
    for key, grad in expected.items():
        torch.testing.assert_close(dict(gpu.named_parameters())[key].grad, grad, rtol=1e-4, atol=1e-6, msg=key)


def test_bf16_training_step_on_cuda_with_checkpointing():
    config = copy.deepcopy(ARCHITECTURES["megabyte"])
    for stage in config.stages:
        stage.checkpoint = True
    model = HierarchicalByteModel(config).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = text_rows(0, 3, 6, 9).cuda()
    mask = torch.ones_like(tokens, dtype=torch.bool)
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nll, count = model(tokens, loss_mask=mask)
        loss = nll / count
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


def test_fused_mamba_kernels_match_the_reference_scan(monkeypatch):
    import multibyte.mixers.mamba as mamba

    if mamba.selective_scan_fn is None or mamba.causal_conv1d_fn is None:
        pytest.skip("mamba-ssm / causal-conv1d not installed (pip install -e '.[cuda]')")
    _, gpu = on_cuda("mambabyte")
    gpu.train()
    tokens = text_rows(0, 4).cuda()
    mask = torch.ones_like(tokens, dtype=torch.bool)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(mamba, "selective_scan_fn", None)  # the chunked reference scan
        gpu.zero_grad()
        nll, count = gpu(tokens, loss_mask=mask)
        (nll / count).backward()
        results.append((nll.detach(), {n: p.grad.clone() for n, p in gpu.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-3)
    for key, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][key], grad, rtol=1e-3, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["megabyte", "vanilla", "mambabyte", "hybrid", "megabyte-3stage", "space"])
def test_cached_decoding_on_cuda_equals_full_recompute(name):
    _, gpu = on_cuda(name)
    tokens = text_rows(0, 11, length=30).cuda()
    with torch.no_grad():
        full = gpu(tokens)  # (B, T, V): logits at t predict byte t from bytes < t
        state = gpu.allocate_decode_state(2, 30)
        logits = gpu.prefill(state, tokens[:, :5])
        steps = [logits]
        for t in range(5, 29):
            steps.append(gpu.decode_step(state, tokens[:, t]))
    cached = torch.stack(steps, dim=1)  # predictions of bytes 5..29
    torch.testing.assert_close(cached, full[:, 5:30].float(), rtol=1e-4, atol=1e-4)


def test_compiled_cuda_graph_decoding_equals_eager():
    from multibyte.sampling import allocate_decode_state, decode_step, prefill

    _, gpu = on_cuda("megabyte")
    tokens = text_rows(0, 11, length=30).cuda()
    outputs = []
    with torch.no_grad():
        for compile in (False, True):
            state = allocate_decode_state(gpu, 2, 30, compile=compile)
            steps = [prefill(gpu, state, tokens[:, :4])]
            for t in range(4, 29):
                steps.append(decode_step(gpu, state, tokens[:, t]).clone())  # CUDA graphs reuse outputs
            outputs.append(torch.stack(steps, dim=1))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
