import pytest
import torch

from policy.sampling import inverse_cdf_sample, sample_tokens


def test_inverse_cdf_hand_computation():
    """cdf = [0.2, 0.2, 0.7, 1.0]: u in (0, 0.2] -> 0, (0.2, 0.7] -> 2, (0.7, 1] -> 3; token 1 (p = 0) never."""
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]]).expand(7, -1)
    u = torch.tensor([1e-7, 0.2, 0.2001, 0.5, 0.7, 0.7001, 1.0])
    assert inverse_cdf_sample(probs, u).tolist() == [0, 0, 2, 2, 2, 3, 3]
    # rows need not be normalised: u is scaled to the row's total
    assert inverse_cdf_sample(probs * 3.0, u).tolist() == [0, 0, 2, 2, 2, 3, 3]
    # a zero-probability first token is never drawn, even for the smallest u
    assert inverse_cdf_sample(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([1e-12])).tolist() == [2]


def test_samples_follow_softmax_over_temperature():
    """Frequencies of 40000 seeded draws match softmax(logits / T) (the seed makes it the same on every run)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, float("-inf")])
    temperature = 0.7
    expected = torch.softmax(logits / temperature, -1)
    token = sample_tokens(logits.expand(40000, -1), temperature, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(token, minlength=5).float() / len(token)
    assert freq[4] == 0
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)
    # seeded: the same draws again, from the global generator too
    again = sample_tokens(logits.expand(40000, -1), temperature, generator=torch.Generator().manual_seed(0))
    assert torch.equal(token, again)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(torch.zeros(2, 3), 0.0)
