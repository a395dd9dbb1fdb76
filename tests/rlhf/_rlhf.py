"""Helpers shared by the tests of dpo_lib.rlhf: a short tensor constructor, a float comparison, a toy reward."""

import torch

T = torch.tensor


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=atol, rtol=0)


def frac_a(texts):
    """The toy ground-truth reward: the fraction of 'a' characters in each text."""
    return [t.count("a") / max(len(t), 1) for t in texts]
