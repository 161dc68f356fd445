import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fsdp_support import run_ranks
from morph_lightning.modeling.quantizer import MorphQuantizer, QuantizerOutput

K, D = 16, 8


def make_quantizer(**kwargs) -> MorphQuantizer:
    torch.manual_seed(0)
    q = MorphQuantizer(codebook_size=K, dim=D, **kwargs)
    with torch.no_grad():
        q.embedding.weight.normal_()  # spread codes out so nearest-neighbour ties are impossible
    return q


def test_shapes_and_nearest_codes() -> None:
    q = make_quantizer().eval()
    z = torch.randn(3, 5, D)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.ids.shape == (3, 5) and out.ids.dtype == torch.long
    assert out.z_q.shape == z.shape
    expected = torch.cdist(z.reshape(-1, D), q.codebook).argmin(dim=-1).view(3, 5)
    assert torch.equal(out.ids, expected)
    torch.testing.assert_close(out.z_q, q.codebook[out.ids])
    torch.testing.assert_close(q.embed(out.ids), q.codebook[out.ids])
    assert q.codebook.shape == (K, D)


def test_straight_through_gradient() -> None:
    q = make_quantizer().eval()
    z = torch.randn(2, 4, D, requires_grad=True)
    q(z).z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_loss_matches_formula() -> None:
    q = make_quantizer(beta=0.4).eval()
    z = torch.randn(2, 6, D, requires_grad=True)
    out = q(z)
    e = q.codebook[out.ids]
    expected = F.mse_loss(e, z.detach()) + 0.4 * F.mse_loss(z, e.detach())
    torch.testing.assert_close(out.loss, expected)
    # codebook term moves the codes, commitment term (beta) moves the encoder output
    out.loss.backward()
    torch.testing.assert_close(z.grad, 0.4 * 2 * (z - e).detach() / z.numel())
    assert q.embedding.weight.grad.abs().sum() > 0


def test_l2_normalize_snaps_to_unit_codes() -> None:
    q = make_quantizer(l2_normalize=True).eval()
    out = q(torch.randn(2, 5, D) * 7)
    torch.testing.assert_close(out.z_q.norm(dim=-1), torch.ones(2, 5))


def test_perplexity_and_usage() -> None:
    q = make_quantizer().eval()
    uniform = q(q.codebook.detach().repeat(3, 1).unsqueeze(0))  # every code hit 3 times
    assert uniform.perplexity.item() == pytest.approx(K, rel=1e-5)
    assert uniform.usage.item() == 1.0
    single = q(q.codebook.detach()[2].expand(1, 10, D))
    assert single.perplexity.item() == pytest.approx(1.0)
    assert single.usage.item() == pytest.approx(1 / K)


def test_usage_ema_only_in_training() -> None:
    q = make_quantizer()
    z = q.codebook.detach()[:1].expand(1, 4, D)
    q.eval()(z)
    torch.testing.assert_close(q.code_usage.usage_ema, torch.full((K,), 1 / K))
    q.train()(z)
    assert q.code_usage.usage_ema[0] > 1 / K > q.code_usage.usage_ema[1]
    stats = q.code_usage.stats()
    assert set(stats) >= {"perplexity", "usage"} and stats["perplexity"] < K


def test_dead_codes_reinitialised() -> None:
    q = make_quantizer(dead_code_threshold=0.1, usage_decay=0.5).train()
    codes = q.codebook.detach().clone()
    torch.manual_seed(1)
    # data that only ever hits codes 0 and 1
    data = torch.cat([codes[:2].repeat(8, 1), codes[:2].repeat(8, 1) + 0.01 * torch.randn(16, D)])
    before = q.embedding.weight.detach().clone()
    for _ in range(6):
        q(data.unsqueeze(0))
    # 0.5**k * 1 < 0.1 after 4 steps: every code but 0 and 1 has collapsed and been revived
    assert q.code_usage.num_reinitialized.item() >= K - 2
    changed = (q.embedding.weight.detach() != before).any(dim=-1)
    assert changed[2:].all()
    # revived codes are encoder outputs from the batch
    assert (q.embedding.weight.detach()[2:, None] == data[None]).all(dim=-1).any(dim=-1).all()


def test_reinit_is_deterministic_and_counts() -> None:
    results = []
    for _ in range(2):
        q = make_quantizer(dead_code_threshold=0.5)
        with torch.no_grad():
            q.code_usage.usage_ema[:5] = 0.0
        torch.manual_seed(3)
        n = q.code_usage.revive(q.embedding.weight, torch.randn(40, D))
        assert n == 5 and q.code_usage.num_reinitialized.item() == 5
        assert torch.allclose(q.code_usage.usage_ema, torch.full((K,), 1 / K))
        results.append(q.embedding.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1])
    fresh = make_quantizer()
    assert fresh.code_usage.revive(fresh.embedding.weight, torch.randn(4, D)) == 0


def test_usage_stats_uniform_ema() -> None:
    stats = make_quantizer().code_usage.stats()
    assert stats["perplexity"] == pytest.approx(K) and stats["usage"] == 1.0
    assert math.isfinite(stats["perplexity"])


def _revive_on_rank(rank: int, world: int) -> dict[str, torch.Tensor]:
    q = make_quantizer(dead_code_threshold=0.1, usage_decay=0.5).train()  # the same start on every rank
    codes = q.codebook.detach().clone()
    # the ranks' batches differ: rank 0 mostly hits code 0, rank 1 code 1, and no rank any other code
    hits = [0] * 12 + [1] * 4 if rank == 0 else [1] * 12 + [0] * 4
    data = codes[hits] + 0.01 * torch.randn(len(hits), D, generator=torch.Generator().manual_seed(rank))
    for _ in range(6):
        q(data.unsqueeze(0))
    return {"codebook": q.codebook.detach(), "usage": q.code_usage.usage_ema, "data": data}


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_ranks_revive_the_same_codes_from_rank_0s_batch(tmp_path) -> None:
    """2 gloo processes with different batches: the usage EMA counts both ranks' codes (all_reduce), and
    the codes revived (every one but 0 and 1, after 4 steps) are rows of rank 0's batch on both ranks
    (broadcast), so the codebooks stay identical. Catches the loss of either collective."""
    ranks = run_ranks(_revive_on_rank, tmp_path)
    torch.testing.assert_close(ranks[0]["usage"], ranks[1]["usage"], rtol=0, atol=0)
    first, second = ranks[0]["codebook"], ranks[1]["codebook"]
    assert torch.equal(first, second)
    revived = first[2:]
    assert (revived[:, None] == ranks[0]["data"][None]).all(dim=-1).any(dim=-1).all()
