"""The W2 distance between diagonal Gaussians (Eq. 18) and the decoder-layer outputs it compares: shared by the
training losses and the drift evaluation.

It lives in the library, not in `train_rcp.py`, because a library module must never import a script: the repair
losses (`train_rcp.w2_repair_loss`, `train_rcp.pooled_w2_repair_loss`) and the representation-drift figures
(`rcp_llava.evaluation`) all need it. `diagonal_w2` is the distance from moments; `gaussian_w2` fits the moments per
sample. (`train_rcp.pooled_w2_repair_loss` writes the same formula over one pooled Gaussian with a full `.mean()`:
routing it through `diagonal_w2` changes its float rounding, and the committed issue-15 runs were made with it.)
"""

import torch


def diagonal_w2(mu_s, var_s, mu_t, var_t, mean_only=False):
    """W2 between diagonal Gaussians from their moments, (..., D) -> (...):
    (||mu_s - mu_t||^2 + ||sqrt(v_s) - sqrt(v_t)||^2) / D; `mean_only` keeps the first term."""
    dim = mu_s.shape[-1]
    w2 = ((mu_s - mu_t) ** 2).sum(-1) / dim
    if mean_only:
        return w2
    # sqrt has an infinite slope at 0: a tiny floor keeps one-position Gaussians (variance 0) differentiable.
    std_s, std_t = torch.sqrt(var_s.clamp_min(0.0) + 1e-12), torch.sqrt(var_t.clamp_min(0.0) + 1e-12)
    return w2 + ((std_s - std_t) ** 2).sum(-1) / dim


def gaussian_w2(student, teacher, mask, mean_only=False):
    """Per-sample W2 distance between diagonal Gaussians fitted to the masked positions (Eq. 18).

    student/teacher: (B, T, D) hidden states; mask: (B, T) bool, the positions of each sample's Gaussian.
    mu = E[h], v = E[h*h] - mu*mu over the masked positions (`diagonal_w2`). Returns (B,); samples without a masked
    position give 0. `mean_only`: the means only (the paper's "mean-only repair loss" ablation).
    """
    w = mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
    count = w.sum(1).clamp_min(1.0)  # (B, 1)

    def moments(h):
        mu = (h * w).sum(1) / count  # (B, D)
        return mu, ((h * h) * w).sum(1) / count - mu * mu

    w2 = diagonal_w2(*moments(student.float()), *moments(teacher.float()), mean_only=mean_only)  # (B,)
    return torch.where(mask.any(1), w2, torch.zeros_like(w2))


__all__ = ["diagonal_w2", "gaussian_w2"]


class LayerOutputs:
    """The decoder layers' own (repaired) outputs of the last forward run inside `with LayerOutputs(model) as outs:`,
    which the repair loss and the drift compare at each layer: `outs.of(output, layers)`, right after that forward.

    Layer i's is `output.hidden_states[i + 1]`, except the last layer's: `hidden_states[L]` is the final norm's
    output, as stock reports it, so the last layer's own output is read as the norm's input (a hook on it)."""

    def __init__(self, model):
        self.norm = model.model.language_model.norm
        self.num_layers = model.config.text_config.num_hidden_layers
        self.last = None

    def __enter__(self):
        self.handle = self.norm.register_forward_pre_hook(lambda module, args: setattr(self, "last", args[0]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def of(self, output, layers):
        """[(B, T, D) output of layer i for i in `layers`] of `output`, the forward run last."""
        return [self.last if i == self.num_layers - 1 else output.hidden_states[i + 1] for i in layers]
