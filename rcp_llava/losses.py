"""The W2 distance between diagonal Gaussians (Eq. 18): shared by the training loss and the drift evaluation.

It lives in the library, not in `train_rcp.py`, because a library module must never import a script: the repair
loss (`train_rcp.w2_repair_loss`) and the representation-drift figures (`rcp_llava.evaluation`) both need it.
"""

import torch


def gaussian_w2(student, teacher, mask):
    """Per-sample W2 distance between diagonal Gaussians fitted to the masked positions (Eq. 18).

    student/teacher: (B, T, D) hidden states; mask: (B, T) bool, the positions of each sample's Gaussian.
    W2 = (||mu_s - mu_t||^2 + ||sqrt(v_s) - sqrt(v_t)||^2) / D with mu = E[h], v = E[h*h] - mu*mu over the
    masked positions. Returns (B,); samples without a masked position give 0.
    """
    w = mask.unsqueeze(-1).to(student.dtype)  # (B, T, 1)
    count = w.sum(1).clamp_min(1.0)  # (B, 1)

    def moments(h):
        mu = (h * w).sum(1) / count  # (B, D)
        var = ((h * h) * w).sum(1) / count - mu * mu
        return mu, var.clamp_min(0.0)

    mu_s, var_s = moments(student.float())
    mu_t, var_t = moments(teacher.float())
    # sqrt has an infinite slope at 0: a tiny floor keeps one-position samples (variance 0) differentiable.
    std_s, std_t = torch.sqrt(var_s + 1e-12), torch.sqrt(var_t + 1e-12)
    dim = student.shape[-1]
    w2 = ((mu_s - mu_t) ** 2).sum(-1) / dim + ((std_s - std_t) ** 2).sum(-1) / dim  # (B,)
    return torch.where(mask.any(1), w2, torch.zeros_like(w2))


__all__ = ["gaussian_w2"]
