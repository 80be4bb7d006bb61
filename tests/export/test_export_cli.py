from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shelfsight.export.cli import main
from shelfsight.export.train import TrainResult
from shelfsight.runtime.manifest import load_manifest


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_then_eval_the_exported_model(
    trained_run: TrainResult, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert trained_run.best is not None
    out = tmp_path / "model"
    code, stdout, _ = _run([str(trained_run.best), "--out", str(out), "--name", "cli-model"], capsys)
    assert code == 0 and "manifest.json" in stdout
    manifest = load_manifest(out)
    assert manifest.name == "cli-model" and manifest.provenance.command.startswith("export-model ")

    result_file = tmp_path / "eval.json"
    code, stdout, _ = _run(["eval", str(out), "--data", str(tiny_data), "--json", str(result_file)], capsys)
    assert code == 0 and "mAP50" in stdout
    onnx_result = json.loads(result_file.read_text())
    assert onnx_result["num_images"] == 4 and 0.0 <= onnx_result["map50"] <= 1.0

    # The same numbers through the PyTorch checkpoint: torch and ORT are scored by one evaluator.
    code, stdout, _ = _run(
        ["eval", str(trained_run.best), "--data", str(tiny_data), "--json", str(result_file)], capsys
    )
    assert code == 0
    torch_result = json.loads(result_file.read_text())
    assert torch_result["map50"] == pytest.approx(onnx_result["map50"], abs=0.01)
    assert torch_result["map50_95"] == pytest.approx(onnx_result["map50_95"], abs=0.01)


def test_train_subcommand_writes_checkpoints(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resume itself is covered by the trainer tests; this checks the flags reach TrainConfig."""
    run = tmp_path / "run"
    argv = ["train", "--data", str(tiny_data), "--out", str(run), "--imgsz", "128", "--batch", "8", "--epochs", "1"]
    argv += ["--width", "0.125", "--workers", "0", "--no-progress", "--seed", "5", "--val-limit", "2"]
    code, stdout, _ = _run(argv, capsys)
    assert code == 0 and "best:" in stdout
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and last["imgsz"] == 128 and last["model_config"]["width"] == 0.125
    assert last["train_config"]["seed"] == 5 and last["train_config"]["batch"] == 8


@pytest.mark.parametrize(
    ("make_argv", "message"),
    [
        (lambda d, t: [str(t / "missing.pt"), "--out", str(t / "m")], "checkpoint not found"),
        (lambda d, t: [str(t / "tensor.pt"), "--out", str(t / "m")], "holds a Tensor"),
        (lambda d, t: [str(t / "tensor.pt"), "--out", str(t / "m"), "--imgsz", "100"], "imgsz"),
        (lambda d, t: ["train", "--data", str(t / "nope.yaml"), "--out", str(t / "r")], "nope.yaml: cannot read"),
        (lambda d, t: ["train", "--data", str(d), "--out", str(t / "r"), "--imgsz", "100"], "multiple of 32"),
        (lambda d, t: ["eval", str(t / "nowhere"), "--data", str(d)], "manifest not found"),
        (lambda d, t: ["eval", str(t / "tensor.pt"), "--data", str(d)], "holds a Tensor"),
    ],
)
def test_errors_are_one_line_on_stderr_with_exit_2(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], make_argv, message: str
) -> None:
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    code, stdout, stderr = _run(make_argv(tiny_data, tmp_path), capsys)
    assert code == 2 and stdout == ""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("export-model: error:") and message in lines[0], stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"]])
def test_help_shows_examples(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "examples:" in capsys.readouterr().out
