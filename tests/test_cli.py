"""`muse-jax data shapes` exports images that follow the spec, with their captions."""
import json

import numpy as np
import PIL.Image

from muse_jax import cli
from muse_jax.data import shapes


def test_data_shapes_export(tmp_path):
    out = tmp_path / "shapes"
    assert cli.main(["data", "shapes", "--out", str(out), "--num", "12", "--split", "test", "--seed", "5"]) == 0
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(records) == 12 and len(list(out.glob("*.png"))) == 12
    for r in records:
        ex = shapes.make_example(5, "test", r["index"])
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / r["file"])), ex["image"])
        assert r["caption"] == ex["caption"]
        assert r["attributes"] == json.loads(ex["attributes"])


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["data", "shapes", "--out", str(tmp_path), "--num", "0"]) == 2
    assert "--num must be positive" in capsys.readouterr().err


def test_train_tokenizer_defaults_to_the_tokenizers_the_stages_read():
    from muse_jax import config as config_lib

    smoke, shapes = config_lib.load_config("smoke"), config_lib.load_config("shapes")
    assert cli.tokenizers_to_train(smoke, None) == ["base", "superres"]  # a tokenizer per stage
    assert cli.tokenizers_to_train(shapes, None) == [""]  # the shared W/tokenizer
    assert cli.tokenizers_to_train(smoke, "all") == sorted(smoke.tokenizers)
    assert cli.tokenizers_to_train(smoke, "") == [""] and cli.tokenizers_to_train(smoke, "base") == ["base"]
