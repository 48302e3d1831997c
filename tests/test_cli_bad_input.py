"""Every subcommand, fed wrong paths, types, ranges, names and files, exits non-zero with one line, no traceback."""
from __future__ import annotations

import sys

import pytest
import torch

from tntcli import cli
from tntcli.models import create_model, save_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    garbage = root / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    tiny = save_model(create_model("tnt-ti", depth=1, img_size=32, patch_size=8, inner_stride=2, num_classes=10),
                      "tnt-ti", root / "tiny.pt")
    tensor = root / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    recipe = root / "bad.yaml"
    recipe.write_text("optim:\n  lrr: 0.1\n")
    broken = root / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    empty = root / "empty"
    empty.mkdir()
    return {"garbage": str(garbage), "tiny": str(tiny), "tensor": str(tensor), "recipe": str(recipe),
            "broken": str(broken), "empty": str(empty), "root": str(root)}


CASES = [
    # flops
    (["flops", "--model", "tnt-x"], "unknown model 'tnt-x'"),
    (["flops", "--model", "tnt-s", "--img-size", "100"], "multiple of the patch size"),
    (["flops", "--model", "tnt-s", "--img-size", "big"], "valid integer"),
    (["flops"], "--all"),
    # train
    (["train", "--recipe", "nope"], "recipe 'nope' not found"),
    (["train", "--recipe", "{recipe}"], "unknown recipe key 'optim.lrr'"),
    (["train", "--recipe", "{broken}"], "not valid YAML"),
    (["train", "--model", "tnt-s", "--data", "digits", "--set", "train.amp=fp8"], "train.amp must be"),
    (["train", "--model", "tnt-s", "--data", "digits", "--set", "noequals"], "section.key=value"),
    (["train", "--model", "nope", "--data", "digits", "--out", "{root}/r1"], "unknown model 'nope'"),
    (["train", "--model", "tnt-s", "--data", "/no/such/folder", "--out", "{root}/r2"], "/no/such/folder"),
    (["train", "--model", "tnt-s", "--data", "{empty}", "--out", "{root}/r3"], "{empty}"),
    (["train", "--epochs", "0", "--data", "digits"], "greater than or equal to 1"),
    (["train", "--resume", "{empty}"], "cannot resume"),
    (["train", "--bogus"], "No such option"),
    # eval
    (["eval", "--checkpoint", "/no/such.pt", "--data", "digits"], "checkpoint not found"),
    (["eval", "--checkpoint", "{garbage}", "--data", "digits"], "cannot read checkpoint"),
    (["eval", "--checkpoint", "{tensor}", "--data", "digits"], "not a state dict"),
    (["eval", "--checkpoint", "{tiny}", "--model", "tnt-s", "--data", "digits"], "does not fit tnt-s"),
    (["eval", "--checkpoint", "{tiny}", "--data", "digits", "--mean", "1,2"], "three comma-separated"),
    (["eval", "--checkpoint", "{tiny}", "--data", "/no/such/folder"], "/no/such/folder"),
    # transfer
    (["transfer", "--checkpoint", "/no/such.pt", "--data", "digits"], "not found"),
    (["transfer", "--checkpoint", "{tiny}", "--data", "digits", "--img-size", "36"], "multiple of the patch"),
    (["transfer", "--checkpoint", "{garbage}", "--data", "digits"], "cannot read checkpoint"),
    # ablate
    (["ablate", "--no-inner", "--inner-heads", "2", "--data", "digits", "--dry-run"], "--inner-heads"),
    (["ablate", "--words", "5", "--data", "digits", "--dry-run"], "5"),
    (["ablate", "--model", "deit-s", "--no-inner", "--data", "digits", "--dry-run"], "deit-s"),
    (["ablate", "--data", "digits", "--dry-run"], "ablation"),
    # results
    (["results", "--runs", "/no/such/runs"], "/no/such/runs"),
    # bench
    (["bench", "--model", "nope", "--reps", "1"], "unknown model 'nope'"),
    (["bench", "--model", "tnt-s", "--precision", "fp8", "--reps", "1"], "fp8"),
    (["bench", "--model", "tnt-s", "--mode", "fly", "--reps", "1"], "fly"),
    # data
    (["data", "write", "/no/such/folder", "{root}/x.beton"], "/no/such/folder"),
    (["data", "bench", "--data", "/no/such/folder"], "/no/such/folder"),
]


@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_gives_one_clear_line_and_nonzero_exit(args, expected, files, monkeypatch, capsys):
    args = [a.format(**files) for a in args]
    monkeypatch.setattr(sys, "argv", ["tnt", *args])
    with pytest.raises(SystemExit) as exit_info:      # any other exception would be a traceback for the user
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code not in (0, None), err
    assert len(err.splitlines()) == 1, err
    assert expected.format(**files) in err, err
