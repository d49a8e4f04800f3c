"""The loss without full logits (multibyte/chunked_loss.py) and activation checkpointing
(StageConfig.checkpoint): both must leave the loss and every gradient as they were."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from architectures import ARCHITECTURES, build
from multibyte.chunked_loss import default_chunk, head_nll, real_positions
from multibyte.config import ModelConfig, StageConfig
from multibyte.model import HierarchicalByteModel
from multibyte.training import ByteLM, masked_byte_nll


def full_nll(hidden, weight, targets, mask):
    logits = (hidden @ weight.T).float()
    nll = F.cross_entropy(logits.flatten(0, -2), targets.reshape(-1), reduction="none")
    return (nll * mask.reshape(-1)).sum()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_head_nll_equals_full_cross_entropy_with_gradients(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 50, 16, requires_grad=True)
    weight = torch.randn(20, 16, requires_grad=True)
    targets = torch.randint(0, 20, (3, 50))
    mask = torch.rand(3, 50) > 0.3
    reference = full_nll(hidden, weight, targets, mask)
    (reference * 0.37).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    loss = head_nll(hidden, weight, targets, mask, chunk=chunk)
    (loss * 0.37).backward()  # the incoming gradient scales both
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, expected[1], rtol=1e-5, atol=1e-6)
    assert hidden.grad[~mask].abs().max() == 0  # positions outside the mask get no gradient
    with torch.no_grad():
        torch.testing.assert_close(head_nll(hidden, weight, targets, mask, chunk=chunk), reference, rtol=1e-6, atol=1e-4)


def test_head_nll_gradient_of_only_one_input():
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 8)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    full_nll(hidden, weight, targets, mask).backward()
    expected = weight.grad.clone()
    weight.grad = None
    head_nll(hidden, weight, targets, mask, chunk=4).backward()
    torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-6)


def test_head_nll_under_bf16_autocast_matches_an_autocast_head():
    # The chunked matmuls run in the autocast dtype, like the nn.Linear head they replace.
    torch.manual_seed(2)
    hidden = torch.randn(4, 40, 32, requires_grad=True)
    weight = (torch.randn(256, 32) * 0.2).requires_grad_()
    targets = torch.randint(0, 256, (4, 40))
    mask = torch.ones(4, 40, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = full_nll(hidden, weight, targets, mask)
    reference.backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_nll(hidden, weight, targets, mask, chunk=16)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-3)
    # bf16 rounding of the products (the reference rounds its one big weight-gradient matmul,
    # the chunks round theirs and add in fp32): equal up to a few bf16 ulps of the largest entry
    for got, want in ((hidden.grad, expected[0]), (weight.grad, expected[1])):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))


def test_head_nll_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="leading shape"):
        head_nll(torch.zeros(2, 5, 4), torch.zeros(3, 4), torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        head_nll(torch.zeros(2, 5, 4), torch.zeros(3, 4), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool), chunk=0)


def test_default_chunk_bounds_the_logits_of_one_chunk():
    assert default_chunk(256) * 256 <= 1 << 20
    assert default_chunk(1 << 30) >= 16


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["megabyte", "vanilla", "megabyte-3stage", "space", "hybrid"])
def test_model_loss_equals_full_logits_loss_with_gradients(name):
    model = build(name).train()
    torch.manual_seed(3)
    tokens = torch.randint(0, 256, (2, 29))
    tokens[:, 2::5] = 32
    lengths = torch.tensor([29, 17])
    nll, count = masked_byte_nll(model(tokens), tokens, lengths)
    expected = grads_of(model, nll / count)
    chunked, chunked_count = model(tokens, loss_mask=real_positions(tokens, lengths))
    assert int(chunked_count) == int(count) == 46
    torch.testing.assert_close(chunked, nll, rtol=1e-6, atol=1e-4)
    got = grads_of(model, chunked / chunked_count)
    assert got.keys() == expected.keys() and "head.weight" in got
    for key in expected:
        # The two losses reach each parameter through different summation orders: rounding, a few
        # fp32 ulps of the gradient's largest entry (a lost or doubled position is ~1/46 of it).
        atol = max(1e-7, 1e-6 * expected[key].abs().max().item())
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=atol, msg=key)


def test_model_refuses_a_loss_mask_of_another_shape():
    model = build("megabyte")
    tokens = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"loss_mask \(2, 7\) must have the shape of tokens \(2, 8\)"):
        model(tokens, loss_mask=torch.ones(2, 7, dtype=torch.bool))


def test_bytelm_step_scores_like_full_logits():
    config = copy.deepcopy(ARCHITECTURES["megabyte"])
    module = ByteLM(config)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([16, 11])
    loss, bpb, num_bytes = module._bits_per_byte((tokens, lengths))
    nll, count = masked_byte_nll(module.model(tokens), tokens, lengths)
    torch.testing.assert_close(loss, nll / count, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bpb, nll / count / math.log(2), rtol=1e-6, atol=1e-6)
    assert int(num_bytes) == 27


def checkpointed(config: ModelConfig, stages: list[int]) -> ModelConfig:
    config = copy.deepcopy(config)
    for i in stages:
        config.stages[i].checkpoint = True
    return config


@pytest.mark.parametrize(
    "name, stages, dropout",
    [("megabyte", [0, 1], 0.0), ("megabyte", [1], 0.2), ("hybrid", [0], 0.0), ("space", [0, 1], 0.1), ("mambabyte", [0], 0.0)],
)
def test_activation_checkpointing_leaves_loss_and_gradients_unchanged(name, stages, dropout):
    config = copy.deepcopy(ARCHITECTURES[name])
    config.dropout = dropout
    plain = HierarchicalByteModel(config).train()
    recomputed = HierarchicalByteModel(checkpointed(config, stages)).train()
    recomputed.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    tokens[:, 3::4] = 32
    mask = torch.ones_like(tokens, dtype=torch.bool)
    results = []
    for model in (plain, recomputed):
        torch.manual_seed(6)  # the same dropout masks on both sides
        loss, count = model(tokens, loss_mask=mask)
        results.append((loss, grads_of(model, loss / count)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-5)
    for key, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], grad, rtol=1e-5, atol=1e-7, msg=key)


def test_activation_checkpointing_recomputes_each_block_in_backward():
    # Checkpointed blocks run twice per training step (forward, then again in backward); in eval
    # and without gradients they run once.
    config = checkpointed(ARCHITECTURES["megabyte"], [0])
    model = HierarchicalByteModel(config).train()
    calls = []
    block = model.stages[0].stack.blocks[0]
    block.register_forward_pre_hook(lambda *args: calls.append(1))  # a recomputation may stop early
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(7))
    loss, count = model(tokens, loss_mask=torch.ones_like(tokens, dtype=torch.bool))
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2
    with torch.no_grad():
        model(tokens)
    assert len(calls) == 3


def test_checkpoint_is_a_stage_setting_that_round_trips():
    config = ModelConfig(
        stages=[
            StageConfig("attention", 32, 1, 2, patcher="fixed", patch_size=4, checkpoint=True),
            StageConfig("attention", 16, 1, 2),
        ]
    )
    data = config.to_dict()
    assert [s["checkpoint"] for s in data["stages"]] == [True, False]
    assert ModelConfig(**{**data, "stages": data["stages"]}).stages[0].checkpoint is True


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 7, 16)])
def test_rmsnorm_training_path_equals_torch_rmsnorm(shape):
    from multibyte.model import RMSNorm

    torch.manual_seed(8)
    ours, reference = RMSNorm(16, eps=1e-5), torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    got = ours(x)
    got.backward(grad)
    got_grads = x.grad.clone(), ours.weight.grad.clone()
    x.grad = None
    want = reference(x)
    want.backward(grad)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grads[0], x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grads[1], reference.weight.grad, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x).dtype == torch.bfloat16  # the linear layer after it needs no copy
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want)


def test_reuse_freed_memory_serves_a_second_large_tensor_without_page_faults():
    import resource

    from multibyte.host_memory import reuse_freed_memory

    if not reuse_freed_memory():
        pytest.skip("not glibc: the allocator cannot be told to keep freed memory")
    assert reuse_freed_memory()  # idempotent

    def faults_of_a_fresh_64mib_tensor() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(16 * 2**20, dtype=torch.float32)
        t.fill_(1.0)  # touch every page
        del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_a_fresh_64mib_tensor()  # the heap grows once
    # 64 MiB is 16,384 pages of 4 KiB: mmap'd afresh, every one of them faults again, every time.
    # The kernel may still take back an idle page now and then (other processes on the machine):
    # the best of five tries must have reused the block.
    assert min(faults_of_a_fresh_64mib_tensor() for _ in range(5)) < 1000


def test_head_token_nll_is_cross_entropy_per_position():
    from multibyte.chunked_loss import head_token_nll

    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 50, 8), torch.randn(256, 8)
    targets = torch.randint(0, 256, (3, 50))
    expected = torch.nn.functional.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction="none")
    torch.testing.assert_close(head_token_nll(hidden, weight, targets, chunk=7), expected.view(3, 50))
