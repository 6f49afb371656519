"""Mistakes a user makes on the command line: one line naming the cause, exit 2, no traceback, and a
workdir left byte for byte as it was.

The workdir is a tiny imported aMUSEd pipeline (an ordinary workdir for sample and edit); training
commands run on a fresh folder with the shapes config.
"""
import hashlib

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("diffusers")

import _amused_fixture as fixture  # noqa: E402

from muse_jax import cli  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    fixture.write_pipeline(root / "src")
    assert cli.main(["import-amused", "--workdir", str(root / "W"), str(root / "src")]) == 0
    PIL.Image.fromarray(fixture.image(16)).save(root / "in.png")
    (root / "not_an_image.png").write_bytes(b"this is text, not a PNG")
    (root / "latin1.txt").write_bytes("a red circle\nun caf\xe9 noir\n".encode("latin-1"))
    PIL.Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "black_mask.png")
    PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "small_mask.png")
    PIL.Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(root / "wide.png")
    return root


def _digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


CASES = [  # (arguments, with {W} and {R} = the workdir and the folder of inputs; words the message holds)
    (["sample", "--workdir", "{W}", "--prompt", "a", "--prompt", "b", "--out", "{R}/g.png"], ["--prompt given twice"]),
    (["sample", "--workdir", "{W}", "--prompts-file", "{R}/latin1.txt", "--out", "{R}/g.png"],
     ["latin1.txt", "line 2", "not UTF-8"]),
    (["edit", "--workdir", "{W}", "--image", "{R}/not_an_image.png", "--prompt", "a", "--out", "{R}/o.png"],
     ["not_an_image.png", "is not an image"]),
    (["sample", "--workdir", "{W}", "--prompt", "a", "--out", "{R}/g.png", "--micro-conditioning", "1,2,3"],
     ["micro_conditioning takes 5 numbers"]),
    (["edit", "--workdir", "{W}", "--image", "{R}/in.png", "--prompt", "a", "--out", "{R}/o.png", "--strength", "2"],
     ["strength must be in [0, 1]"]),
    (["sample", "--workdir", "{R}/nowhere", "--prompt", "a", "--out", "{R}/g.png"], ["nowhere", "does not exist"]),
    (["sample", "--workdir", "{W}", "--prompt", "a", "--out", "{R}/g.png", "--num", "0"], ["--num must be positive"]),
    (["sample", "--workdir", "{W}", "--prompt", "a", "--out", "{R}/g.png", "--steps", "0"], ["must be >= 1"]),
    (["sample", "--workdir", "{W}", "--prompt", "a", "--out", "{R}/g.png", "--temperature", "0"],
     ["temperature must be > 0"]),
    (["sample", "--workdir", "{W}", "--prompt", "a"], ["give --out"]),
    (["edit", "--workdir", "{W}", "--image", "{R}/wide.png", "--prompt", "a", "--out", "{R}/o.png"],
     ["wide.png", "crop it first"]),
    (["edit", "--workdir", "{W}", "--image", "{R}/in.png", "--mask", "{R}/small_mask.png", "--prompt", "a",
      "--out", "{R}/o.png"], ["small_mask.png", "same size"]),
    (["edit", "--workdir", "{W}", "--image", "{R}/missing.png", "--prompt", "a", "--out", "{R}/o.png"],
     ["missing.png", "does not exist"]),
]
TRAIN_CASES = [
    (["--config.train.lrr=1"], ["lrr"]),
    (["--config", "no_such_config"], ["no_such_config", "named configs"]),
    (["--config.train.log_every=0"], ["config.train.log_every=0"]),
    (["--config.train.num_steps=-5"], ["config.train.num_steps=-5"]),
    (["--config.train.batch_size=0"], ["config.train.batch_size=0"]),
]


@pytest.mark.parametrize("args, words", CASES, ids=[c[0][0] + ":" + c[1][0] for c in CASES])
def test_sample_and_edit_mistakes(workdir, args, words, capsys):
    before = _digest(workdir / "W")
    args = [a.format(W=workdir / "W", R=workdir) for a in args]
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    for w in words:
        assert w in line, line
    assert _digest(workdir / "W") == before


@pytest.mark.parametrize("overrides, words", TRAIN_CASES, ids=[c[1][0] for c in TRAIN_CASES])
def test_train_mistakes_write_nothing(tmp_path, overrides, words, capsys):
    (tmp_path / "W").mkdir()
    config = [] if "--config" in overrides else ["--config", "shapes"]
    assert cli.main(["train", "--workdir", str(tmp_path / "W"), *config, *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err
    assert list((tmp_path / "W").iterdir()) == []


def test_a_mask_that_selects_nothing_is_warned_about(workdir, capsys):
    with pytest.warns(UserWarning, match="1 of 1 masks select no pixel"):
        assert cli.main(["edit", "--workdir", str(workdir / "W"), "--image", str(workdir / "in.png"), "--prompt", "a",
                         "--mask", str(workdir / "black_mask.png"), "--out", str(workdir / "same.png")]) == 0
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(workdir / "same.png")),
                                  np.asarray(PIL.Image.open(workdir / "in.png")))


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args, overrides):
        raise KeyError("'lrr'\nDid you mean \"lr\"?")

    monkeypatch.setattr(cli, "_ema", broken)
    args = ["ema", "--workdir", "W", "--stage", "base"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == "muse-jax ema: error: KeyError: 'lrr' Did you mean \"lr\"? (MUSE_JAX_DEBUG=1 shows the traceback)"
    monkeypatch.setenv("MUSE_JAX_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(args)
