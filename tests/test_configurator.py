import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ConfigError, configure  # noqa: E402


@pytest.fixture(autouse=True)
def _rank0(monkeypatch):
    monkeypatch.delenv('RANK', raising=False)


def defaults():
    import math  # a module among the globals must not become a config key
    return dict(
        batch_size=32,
        learning_rate=3e-4,
        init_from='scratch',
        data_path='data/train.json',
        vision_path=None,
        compile=False,
        betas=(0.9, 0.95),
        layers=[1, 2],
        extra={'a': 1},
        math=math,
        helper=lambda: None,
        _private=1,
    )


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_returns_config_keys_only():
    g = defaults()
    config = configure(g, [])
    assert set(config) == {'batch_size', 'learning_rate', 'init_from', 'data_path', 'vision_path',
                           'compile', 'betas', 'layers', 'extra'}
    assert config['batch_size'] == 32


def test_reads_sys_argv_by_default(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['train.py', '--batch_size=8'])
    g = defaults()
    configure(g)
    assert g['batch_size'] == 8


def test_file_then_override_order(tmp_path):
    f1 = write(tmp_path, 'a.py', "batch_size = 64\ninit_from = 'resume'\n")
    f2 = write(tmp_path, 'b.py', "batch_size = 128\n")
    g = defaults()
    config = configure(g, [f1, '--batch_size=16', f2, '--init_from=gpt2'])
    assert g['batch_size'] == 128  # f2 came after the override
    assert g['init_from'] == 'gpt2'
    assert config['batch_size'] == 128 and config['init_from'] == 'gpt2'

    g = defaults()
    configure(g, [f1, f2, '--batch_size=16'])
    assert g['batch_size'] == 16
    assert g['init_from'] == 'resume'


def test_split_on_first_equals():
    g = defaults()
    configure(g, ['--data_path=a=b.json'])
    assert g['data_path'] == 'a=b.json'


def test_int_for_float():
    g = defaults()
    configure(g, ['--learning_rate=1'])
    assert g['learning_rate'] == 1.0 and type(g['learning_rate']) is float
    configure(g, ['--learning_rate=1e-3'])
    assert g['learning_rate'] == 1e-3


def test_int_for_float_in_config_file(tmp_path):
    g = defaults()
    configure(g, [write(tmp_path, 'c.py', "learning_rate = 2\n")])
    assert type(g['learning_rate']) is float and g['learning_rate'] == 2.0


def test_none_default_takes_int():
    g = defaults()
    configure(g, ['--vision_path=5'])
    assert g['vision_path'] == 5


def test_none_default_takes_string():
    g = defaults()
    configure(g, ['--vision_path=ckpt/vision.pt'])
    assert g['vision_path'] == 'ckpt/vision.pt'
    configure(g, ["--vision_path='quoted.pt'"])
    assert g['vision_path'] == 'quoted.pt'


@pytest.mark.parametrize('raw, expected', [('true', True), ('True', True), ('TRUE', True),
                                           ('false', False), ('False', False)])
def test_bool_spellings(raw, expected):
    g = defaults()
    g['compile'] = not expected
    configure(g, [f'--compile={raw}'])
    assert g['compile'] is expected


@pytest.mark.parametrize('raw', ['1', '0', 'yes'])
def test_bool_rejects_non_bool(raw):
    with pytest.raises(ConfigError) as e:
        configure(defaults(), [f'--compile={raw}'])
    msg = str(e.value)
    assert 'compile' in msg and 'bool' in msg and '0/1' in msg


def test_str_default_keeps_numeric_looking_value():
    g = defaults()
    configure(g, ['--init_from=123'])
    assert g['init_from'] == '123'
    configure(g, ['--init_from=1e3'])
    assert g['init_from'] == '1e3'
    configure(g, ['--init_from=None'])  # None switches an optional path off
    assert g['init_from'] is None
    configure(g, ["--init_from='None'"])
    assert g['init_from'] == 'None'


def test_list_and_tuple():
    g = defaults()
    configure(g, ['--betas=[0.8, 0.99]', '--layers=(3, 4, 5)'])
    assert g['betas'] == (0.8, 0.99) and type(g['betas']) is tuple
    assert g['layers'] == [3, 4, 5] and type(g['layers']) is list
    configure(g, ['--extra={"b": 2}'])
    assert g['extra'] == {'b': 2}


def test_unknown_key_in_argv():
    with pytest.raises(ConfigError) as e:
        configure(defaults(), ['--bacth_size=4'])
    msg = str(e.value)
    assert 'bacth_size' in msg and 'batch_size' in msg


def test_unknown_name_in_config_file(tmp_path):
    path = write(tmp_path, 'bad.py', "batch_size = 4\nlearnig_rate = 1e-3\n")
    g = defaults()
    with pytest.raises(ConfigError) as e:
        configure(g, [path])
    msg = str(e.value)
    assert path in msg and 'learnig_rate' in msg and 'learning_rate' in msg
    assert g['batch_size'] == 32  # a rejected file changes nothing


def test_config_file_may_import_math(tmp_path):
    path = write(tmp_path, 'm.py', "import math\nfrom math import sqrt\n"
                                   "def _f(x):\n    return x\n"
                                   "learning_rate = math.sqrt(4) * 1e-4\nbatch_size = int(sqrt(16))\n")
    g = defaults()
    configure(g, [path])
    assert g['learning_rate'] == pytest.approx(2e-4)
    assert g['batch_size'] == 4
    assert g['math'] is defaults()['math']  # the file's import did not leak into g


def test_config_file_wrong_type(tmp_path):
    path = write(tmp_path, 't.py', "batch_size = 'big'\n")
    with pytest.raises(ConfigError) as e:
        configure(defaults(), [path])
    assert 'batch_size' in str(e.value) and 'int' in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match='nope.py'):
        configure(defaults(), [str(tmp_path / 'nope.py')])


def test_wrong_type_message():
    with pytest.raises(ConfigError) as e:
        configure(defaults(), ['--batch_size=3.5'])
    msg = str(e.value)
    assert 'batch_size' in msg and 'int' in msg and '3.5' in msg


def test_key_without_value():
    with pytest.raises(ConfigError) as e:
        configure(defaults(), ['--compile'])
    msg = str(e.value)
    assert 'compile' in msg and '--key=value' in msg


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_prints_on_rank0(tmp_path, capsys):
    path = write(tmp_path, 'p.py', "batch_size = 64\n")
    configure(defaults(), [path, '--learning_rate=0.1'])
    out = capsys.readouterr().out
    assert f'Overriding config with {path}:' in out
    assert 'batch_size = 64' in out
    assert 'Overriding: learning_rate = 0.1' in out


def test_silent_on_other_ranks(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('RANK', '1')
    path = write(tmp_path, 'p.py', "batch_size = 64\n")
    g = defaults()
    configure(g, [path, '--learning_rate=0.1'])
    assert capsys.readouterr().out == ''
    assert g['batch_size'] == 64 and g['learning_rate'] == 0.1


def test_nanogpt_exec_idiom_applies_the_command_line(tmp_path):
    """A fork that writes nanoGPT's `exec(open('configurator.py').read())` gets its overrides applied
    (and a typo reported), not silently ignored."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "train.py"
    script.write_text("batch_size = 32\nname = 'a'\nexec(open('configurator.py').read())\nprint(batch_size, name)\n")
    env = dict(os.environ, PYTHONPATH=root)  # as if the script lived beside configurator.py
    p = subprocess.run([sys.executable, str(script), "--batch_size=64", "--name=b"], cwd=root, capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "64 b", p.stdout + p.stderr
    p = subprocess.run([sys.executable, str(script), "--bacth_size=64"], cwd=root, capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 1 and "bacth_size" in p.stderr and "batch_size" in p.stderr, p.stderr


def test_help_prints_the_docstring_and_every_setting_with_its_comment():
    """A newcomer's first try: `python evaluate.py --help` shows what the script does and each setting
    as the script writes it (default and comment), and exits 0 without running anything."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cmd, first, setting in ((["evaluate.py"], "Evaluate a checkpoint on benchmarks",
                                 'init_from = "out/sft"      # checkpoint dir'),
                                (["-m", "shapes.prepare"], "The built-in synthetic", "seed = "),
                                (["sft.py"], "Visual instruction tuning", "lr_lm = ")):
        r = subprocess.run([sys.executable, *cmd, "--help"], cwd=root, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(first), r.stdout[:200]
        assert setting in r.stdout, r.stdout
        assert "settings (override with --key=value" in r.stdout
