"""Shared fixtures: tiny models built from transformers configs (no downloads), a tiny tokenizer.

Tests that take more than ~5 s on 2 CPU cores (end-to-end stage runs, torchrun with 2 ranks, kernel
compiles, pretraining) are marked `slow`: `python -m pytest -m "not slow" tests/` is the inner loop
(under 3 minutes), `python -m pytest tests/` runs everything (what CI runs)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)
if not torch.cuda.is_available():  # run model.py's Triton kernel on CPU tensors (read when model.py is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~5 s on 2 CPU cores; deselect with -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    """The two pretraining runs first (about 5 and 1 minutes, single-threaded): run in parallel (`-n 2`, as
    CI does), they start at once on one worker while the other takes the rest, instead of trailing at the
    end while a worker idles. The order changes nothing else: no test depends on another's leftovers."""
    items.sort(key=lambda it: not (it.get_closest_marker("slow") and "test_pretrain.py" in it.nodeid))


class Killed(BaseException):
    """The process died: nothing after it happens, not even cleanup."""


class Killer:
    """Counts filesystem operations (ops: (module, name) pairs; by default those of a checkpoint save) and
    'kills' the process at the k-th: that operation and every later one raise Killed, the operations in
    `after` too (clean-up a real kill never reaches, e.g. write_atomic's unlink), without being counted.
    A kill inside rmtree leaves the tree half deleted."""

    SAVE = ((os, "replace"), (os, "rename"), (os, "makedirs"), (os, "fsync"), (shutil, "rmtree"))

    def __init__(self, monkeypatch, k, ops=SAVE, after=()):
        self.k, self.n, self.dead = k, 0, False
        for mod, name in ops:
            monkeypatch.setattr(mod, name, self.hook(getattr(mod, name), name))
        for mod, name in after:
            monkeypatch.setattr(mod, name, self.hook(getattr(mod, name), name, counted=False))

    def hook(self, real, name, counted=True):
        def op(*args, **kwargs):
            if self.dead:
                raise Killed
            if counted:
                self.n += 1
                if self.n == self.k:
                    self.dead = True
                    if name == "rmtree" and os.path.isdir(args[0]):
                        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args[0]) for f in fs)
                        if files:
                            os.remove(files[0])
                    raise Killed
            return real(*args, **kwargs)
        return op


def tiny_configs(vocab_size=128, image_size=32, patch_size=8, tie=False):
    from transformers import CLIPVisionConfig, LlamaConfig
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=tie, pad_token_id=0)
    return vision, text


def make_tokenizer(with_image=True):
    """A byte-level BPE tokenizer trained on a few sentences (with or without the <image> token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"] + (["<image>"] if with_image else [])
    text = ["USER: Is there a red circle? ASSISTANT: Yes.", "A blue square is in the top left.",
            "Describe the image. There are two objects.", "What color is the ring? Green."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"] if with_image else [])


def tiny_world_vlm(shapes_dir, max_positions=512, seed=0, lm_dropout=0.0):
    """A tiny untrained chat-template VLM on a shapes world's tokenizer (48px images, 9 patches);
    lm_dropout: the LM's attention dropout (training draws random numbers)."""
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig
    import model as M
    tok = AutoTokenizer.from_pretrained(f"{shapes_dir}/tokenizer")
    lm = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, max_position_embeddings=max_positions, tie_word_embeddings=True,
                     attention_dropout=lm_dropout,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=48, patch_size=16)
    torch.manual_seed(seed)
    return M.VLM.from_parts(lm=lm, vision=vision, tokenizer=tok, template="chat")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Variables a developer's shell or CI may carry that change what the scripts print or do."""
    for k in ("LUCID_TRACEBACK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


def run_inprocess(script, args, monkeypatch):
    """The script in this process; what it changes process-wide (the RNG it seeds, the hooks configure()
    installs) is put back, so later tests see the same state whichever ran before."""
    import runpy
    import warnings
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.chdir(ROOT)
    rng = torch.get_rng_state()
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        torch.set_rng_state(rng)


def run_script(script, args, nproc=1, timeout=600):
    """Run a stage script in a subprocess (under torchrun when nproc > 1); fail with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, script, *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def run_sft(args, nproc=1, timeout=600):
    return run_script("sft.py", args, nproc, timeout)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small shapes world; returns the sft.py arguments that point at it."""
    d = tmp_path_factory.mktemp("shapes")
    p = subprocess.run([sys.executable, "-m", "shapes.prepare", f"--out_dir={d}", "--n_train=200", "--n_val=20", "--n_test=10"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return [f"--data_path={d}/train.json", f"--val_data_path={d}/val.json", f"--image_root={d}/images",
            f"--tokenizer_path={d}/tokenizer", f"--vision_path={ROOT}/shapes/models/clip"]
