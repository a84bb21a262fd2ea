"""The mechanism's randomness: not reproducible from a 32-bit seed, and distributed as claimed."""

from __future__ import annotations

import math
import secrets
from unittest import mock

import pytest
import torch
from scipy import stats

from fed.privacy import secure_rng
from fed.privacy.dpsgd import DpStepper, check_dp_compatible
from fed.privacy.mechanism import DpSettings, poisson_batches
from tests.helpers import tiny_bert


def regenerable_from_32_bits(draw) -> bool:
    """The server's attack: if the noise source is a torch generator, reseed a fresh one with the low
    32 bits of its seed (all a CPU Mersenne Twister keeps) and compare the streams."""
    source = draw.__self__ if hasattr(draw, "__self__") else None
    if not isinstance(source, torch.Generator):
        return False
    replay = torch.Generator().manual_seed(source.initial_seed() & 0xFFFFFFFF)
    return torch.equal(draw(1000), torch.randn(1000, generator=replay))


def test_the_attack_check_catches_a_32_bit_seeded_generator():
    gen = torch.Generator().manual_seed(secrets.randbits(63))  # the foundation's private_generator
    draw = lambda n: torch.randn(n, generator=gen)  # noqa: E731  (any draw callable will do; the check reads its __self__)
    draw.__self__ = gen  # type: ignore[attr-defined]  # as a bound method would carry it
    assert regenerable_from_32_bits(draw)


SOURCES = ["os", "stream"]


@pytest.mark.parametrize("source", SOURCES)
def test_noise_is_not_regenerable_and_never_repeats(source):
    assert not regenerable_from_32_bits(lambda n: secure_rng.normal((n,), 1.0, source=source))
    a, b = secure_rng.normal((4096,), 1.0, source=source), secure_rng.normal((4096,), 1.0, source=source)
    assert not torch.equal(a, b)
    assert secure_rng.random_bytes(64, source) != secure_rng.random_bytes(64, source)


@pytest.mark.parametrize("source", SOURCES)
def test_noise_reads_only_the_os_csprng(monkeypatch, source):
    """Same OS bytes, same noise: the draws are a function of os.urandom alone (no hidden seeded state; the
    stream's key and nonce are OS bytes too, drawn anew each time)."""
    monkeypatch.setattr(secure_rng.os, "urandom", lambda n: bytes(range(256)) * (n // 256) + bytes(n % 256))
    assert torch.equal(secure_rng.normal((300,), 2.0, source=source), secure_rng.normal((300,), 2.0, source=source))


def test_the_stream_is_chacha20_keyed_from_the_os():
    """An independent check of the keystream: RFC 7539's ChaCha20 as written in pycryptodome, under the key
    and nonce the OS handed out, gives the same bytes."""
    from Crypto.Cipher import ChaCha20

    handed = [bytes(range(32)), bytes(range(100, 112))]  # the key, then the nonce (after a zero block counter)
    with mock.patch.object(secure_rng.os, "urandom", side_effect=lambda n: handed.pop(0)[:n]):
        stream = secure_rng.random_bytes(1000, "stream")
    assert stream == ChaCha20.new(key=bytes(range(32)), nonce=bytes(range(100, 112))).encrypt(bytes(1000))


def test_an_unknown_noise_source_is_refused_by_name():
    with pytest.raises(ValueError, match="'dev-random'.*stream, os"):
        secure_rng.random_bytes(8, "dev-random")


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gaussian_has_the_claimed_distribution(source, dtype):
    """Kolmogorov-Smirnov against scipy's normal CDF, and the first four moments against their sampling spread."""
    n = 40000
    z = secure_rng.normal((n,), 3.0, dtype, source=source).double().numpy() / 3.0
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert abs(z.mean()) < 5 / n**0.5 and abs(z.var() - 1) < 5 * (2 / n) ** 0.5
    assert abs(stats.skew(z)) < 5 * (6 / n) ** 0.5 and abs(stats.kurtosis(z)) < 5 * (24 / n) ** 0.5
    assert stats.kstest(secure_rng.uniform(n, source).numpy(), "uniform").pvalue > 1e-4


def test_poisson_batches_have_the_claimed_size():
    sizes = [len(b) for b in poisson_batches(1000, 0.05, 400)]
    assert abs(sum(sizes) / len(sizes) - 50) < 2.5  # mean of 400 Binomial(1000, 0.05): sd 0.34
    assert all(i < 1000 for b in poisson_batches(1000, 0.5, 3) for i in b)


def test_dp_step_noise_comes_from_the_csprng(monkeypatch):
    """The DP optimizer's noise is secure_rng's (patched to a constant here), not Opacus's generator."""
    from fed.adapters import AdapterSpec, build

    model = tiny_bert()
    adapter = build(model, AdapterSpec("ffa-lora", 2, 4.0, ("query",)), 0, head=("classifier.weight",))
    monkeypatch.setattr(secure_rng, "normal", lambda shape, std, dtype=torch.float32, *_: torch.full(shape, 7.0))
    before = adapter.state(adapter.names(trainable=True))
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=1.0)
    stepper = DpStepper(
        model, opt, DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, num_examples=2)
    )
    stepper.empty_step()
    stepper.close()
    for name, value in adapter.state(adapter.names(trainable=True)).items():
        torch.testing.assert_close(before[name] - value, torch.full_like(value, 7.0))  # noise / expected batch 1


@pytest.mark.parametrize("source", SOURCES)
def test_a_dp_step_draws_its_noise_once_for_every_tensor_from_the_configured_source(monkeypatch, source):
    from fed.adapters import AdapterSpec, build

    model = tiny_bert()
    adapter = build(model, AdapterSpec("lora", 2, 4.0, ("query", "value")), 0, head=("classifier.weight",))
    draws: list[tuple] = []
    real = secure_rng.normal
    monkeypatch.setattr(secure_rng, "normal", lambda *a: draws.append(a) or real(*a))
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=1.0)
    dp = DpSettings(noise_multiplier=2.0, max_grad_norm=0.5, sample_rate=0.5, num_examples=2, noise_source=source)
    before = adapter.state(adapter.names(trainable=True))
    stepper = DpStepper(model, opt, dp)
    stepper.empty_step()
    stepper.close()
    total = sum(p.numel() for p in adapter.trainable_parameters())
    assert [(d[0], d[1], d[-1]) for d in draws] == [((total,), 1.0, source)]
    moved = torch.cat([(before[n] - v).flatten() for n, v in adapter.state(adapter.names(trainable=True)).items()])
    # sigma * C / expected batch = 1 for every tensor; the sample std of n normals has std 1/sqrt(2n): 5 of those
    assert moved.numel() == total and abs(float(moved.std()) - 1.0) < 5 / math.sqrt(2 * total)


def test_dropout_is_off_during_dp_steps_and_restored_after():
    model = tiny_bert()
    dropout = torch.nn.Dropout(0.5)
    model.bert.embeddings.dropout = dropout
    from fed.adapters import AdapterSpec, build

    adapter = build(model, AdapterSpec("lora", 2, 4.0, ("query",)), 0)
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=1.0)
    stepper = DpStepper(
        model, opt, DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, num_examples=2)
    )
    assert dropout.p == 0.0
    stepper.close()
    assert dropout.p == 0.5


def test_batch_norm_is_refused_under_dp():
    with pytest.raises(ValueError, match="BatchNorm"):
        check_dp_compatible(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    check_dp_compatible(tiny_bert())  # LayerNorm is per example: fine


def test_loss_release_clips_each_example_and_the_gradient_keeps_the_rest_of_the_budget(monkeypatch):
    dp = DpSettings(
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        sample_rate=0.1,
        num_examples=100,
        loss_noise_multiplier=4.0,
        loss_clip=3.0,
    )
    monkeypatch.setattr(
        secure_rng, "normal", lambda shape, std, dtype=torch.float32, *_, **__: torch.zeros(shape, dtype=dtype)
    )
    assert dp.noised_loss_sum(torch.tensor([0.5, 7.0, -1.0])) == pytest.approx(0.5 + 3.0 + 0.0)
    assert dp.noised_loss_sum(None) == 0.0  # an empty batch releases noise only
    sigma_g = dp.gradient_noise_multiplier
    assert pytest.approx(1 / sigma_g**2 + 1 / 4.0**2) == 1 / 2.0**2 and sigma_g > 2.0
    with pytest.raises(ValueError, match="must exceed"):
        _ = DpSettings(
            noise_multiplier=2.0,
            max_grad_norm=1.0,
            sample_rate=0.1,
            num_examples=100,
            loss_noise_multiplier=1.5,
            loss_clip=3.0,
        ).gradient_noise_multiplier
