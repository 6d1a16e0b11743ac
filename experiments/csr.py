# Calibrated self-rewarding on the shapes world: 3 iterations of selfreward.py (CSR mode) -> dpo.py
# (LoRA, adapters-off reference) from the base runs of experiments/base.py (same out_dir: finished base
# steps are reused), and the ablations of the first iteration: lambda 0 (self-reward without visual
# calibration) and 0.5, raw values instead of ranks, pruning by the calibrated reward instead of the LM.
# Held equal in every run: the seed's base checkpoint, the 1,000 prompts, the search budget, the DPO
# recipe and steps (1 epoch over the pairs found), the evaluation suite.
#   python -m experiments.run experiments/csr.py
from experiments.base import out_dir, runs as _base, seeds  # the base runs, their out_dir and seeds: one definition
_BASE = _base["base"]["steps"]


def iteration(init, extra=""):
    """One CSR iteration from the model `init`: sample and score trees, then DPO on their pairs."""
    return [f"selfreward.py config/shapes_csr.py --seed={{seed}} --init_from={init} --out_dir={{dir}}/sample {extra}",
            f"dpo.py config/shapes_csr_dpo.py --seed={{seed}} --init_from={init} --data_path={{dir}}/sample/pairs.json "
            f"--out_dir={{dir}}/dpo"]


runs = {
    "base": {"steps": _BASE, "model": "{dir}/stage2"},
    "csr1": {"steps": iteration("{out}/base/seed{seed}/stage2"), "model": "{dir}/dpo"},
    "csr2": {"steps": iteration("{out}/csr1/seed{seed}/dpo"), "model": "{dir}/dpo"},
    "csr3": {"steps": iteration("{out}/csr2/seed{seed}/dpo"), "model": "{dir}/dpo"},
    "csr1_lam0": {"steps": iteration("{out}/base/seed{seed}/stage2", "--lam=0.0"), "model": "{dir}/dpo"},
    "csr1_lam0.5": {"steps": iteration("{out}/base/seed{seed}/stage2", "--lam=0.5"), "model": "{dir}/dpo"},
    "csr1_raw": {"steps": iteration("{out}/base/seed{seed}/stage2", "--combine=raw"), "model": "{dir}/dpo"},
    "csr1_prune_reward": {"steps": iteration("{out}/base/seed{seed}/stage2", "--prune_by=reward"), "model": "{dir}/dpo"},
}
