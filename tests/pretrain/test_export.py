"""`python -m mmrec_model.export` (mmrec-export): a pretrain run as a transformers model folder."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from mmrec_model.export import main  # noqa: E402
from mmrec_model.hf import MMRecForCausalLM  # noqa: E402
from mmrec_model.training import load_model  # noqa: E402
from tests.pretrain.cli import run_module, succeeded  # noqa: E402

pytestmark = [pytest.mark.pretrain, pytest.mark.hf]


def test_export_writes_a_folder_that_generates_as_the_run_does(tmp_path, trained_run):
    out = tmp_path / "hf"
    printed = succeeded(run_module("mmrec_model.export", [trained_run, out], tmp_path)).stdout
    assert printed.strip() == f"mmrec-export: wrote {out}"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    prompt = torch.tensor([list(b"import ")])
    expected = load_model(trained_run, torch.device("cpu")).generate(prompt, 30, temperature=0)
    exported = MMRecForCausalLM.from_pretrained(out).generate(prompt, max_new_tokens=30, do_sample=False)
    assert exported.tolist() == expected.tolist()


@pytest.mark.parametrize("problem", ["no run", "a file", "OUT_DIR with files"])
def test_bad_input_is_one_line_and_exit_status_1(tmp_path, trained_run, capsys, problem):
    run, out = trained_run, tmp_path / "hf"
    if problem == "no run":
        run = tmp_path / "missing"
    elif problem == "a file":
        run = tmp_path / "notes.txt"
        run.write_text("not a checkpoint")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    assert main([str(run), str(out)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("mmrec-export: error: ") and error.count("\n") == 1, error
    assert not out.exists() or [p.name for p in out.iterdir()] == ["keep.txt"]
