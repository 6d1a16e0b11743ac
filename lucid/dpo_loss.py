"""
The DPO loss and its variants, with TRL 1.x's formulas (tests compare them with TRL's).
"""
import torch
import torch.nn.functional as F


DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair DPO losses from sequence log-probs (pairs,), with TRL 1.x's formulas. logits is how
    much more the policy prefers chosen over rejected than the reference does:
        sigmoid  -logsigmoid(beta logits)                                  (DPO)
        robust   (-(1-ls) logsigmoid(beta logits) + ls logsigmoid(-beta logits)) / (1 - 2 ls)
                                                   (robust DPO: unbiased when a share ls of the labels is flipped)
        ipo      (logits - 1/(2 beta))^2           (IPO; TRL gives it length-normalised log-probs: dpo.py does too)
        hinge    relu(1 - beta logits)             (SLiC / RSO)
    TRL 1.x's sigmoid ignores label_smoothing (0.x used it for conservative DPO); here a label_smoothing
    with any loss but robust is an error rather than silently dropped.
    Returns (losses, chosen_rewards, rejected_rewards), rewards = beta (policy - reference), detached."""
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if label_smoothing and loss_type != "robust":
        raise ValueError(f"label_smoothing is read by loss_type='robust' only (got {label_smoothing} with {loss_type!r})")
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSSES}, got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
