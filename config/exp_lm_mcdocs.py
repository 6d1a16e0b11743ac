# The LM corpus' multiple-choice documents (issue 9): until this fix they were built in the `plain`
# template, which keeps only the answers, so the LM read 20 % of its documents as bare letter sequences
# ("B\nD\nC") and never a multiple-choice question. The base (stage 1 + stage 2, default world, shipped CLIP)
# on the LM shipped then against the same LM after 1,500 more steps on the corrected corpus (same mix, lr 1e-3):
#   python pretrain_shapes.py --which=lm --lm_init=<the LM shipped before> --lm_steps=1500 --lm_lr=1e-3 --out_dir=out/models/lm_mcfix
#   python pretrain_shapes.py --which=lm --lm_init=<the LM shipped before> --lm_steps=1500 --lm_lr=1e-3 \
#       --lm_mix=recall:0.35,chat:0.2,mc:0.2,verify:0.15,caption:0.1 --out_dir=out/models/lm_verify
#   python experiment.py config/exp_lm_mcdocs.py
out_dir = "out/exp_lm_mcdocs"
seeds = [1, 2, 3]


def _base(lm):
    return [f"sft.py config/shapes_stage1.py --seed={{seed}} --lm_path={lm} --out_dir={{dir}}/stage1",
            f"sft.py config/shapes_stage2.py --seed={{seed}} --init_from={{dir}}/stage1 --out_dir={{dir}}/stage2"]


runs = {
    "before": {"steps": _base("models/shapes/lm"), "model": "{dir}/stage2"},
    "mcfix": {"steps": _base("out/models/lm_mcfix/lm"), "model": "{dir}/stage2"},
    "verify": {"steps": _base("out/models/lm_verify/lm"), "model": "{dir}/stage2"},
    # the same stage 1, then stage 2 on instruction data whose multiple-choice wrong options are the scene's own
    # values first (python prepare_shapes.py --mc_hard=0.7 --out_dir=data/shapes_pc_mch; evaluation files identical)
    "verify_mch": {"steps": ["sft.py config/shapes_stage2.py --seed={seed} --init_from={out}/verify/seed{seed}/stage1 "
                             "--data_path=data/shapes_pc_mch/train.json --val_data_path=data/shapes_pc_mch/val.json "
                             "--out_dir={dir}/stage2"], "model": "{dir}/stage2"},
}
