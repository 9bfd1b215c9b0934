"""The whole recipe (core/recipe.py) and `prunery prune`'s data options: sparse training, data-driven
importance, a MACs target, recovery and evaluation in the report; refusals of what cannot work."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunery.core import PruneConfig, PruneError, count, load_program
from prunery.core.data import Dataset, save_dataset
from prunery.core.recipe import Recipe, run_recipe
from prunery.core.targets import Target


def _task(seed: int = 0, n: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes, each a Gaussian blob in 32 dims: learnable in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 32, generator=g) * 2
    y = torch.randint(0, 10, (n,), generator=g)
    return centers[y] + torch.randn(n, 32, generator=g), y


@pytest.fixture(scope="module")
def trained() -> tuple[torch.export.ExportedProgram, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = _task()
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for step in range(300):
        i = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ep = torch.export.export(model.eval(), (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},))
    return ep, x, y


def test_sparse_training_a_target_and_recovery_end_to_end(trained) -> None:
    ep, x, y = trained
    stages: list[str] = []
    recipe = Recipe(dataset=Dataset(x, y), sparse_steps=60, reg=1e-3, finetune_steps=60, target=Target("macs", 0.25),
                    latency_batch=8, device="cpu")
    result = run_recipe(ep, PruneConfig(ratio=0.5, importance="taylor"), recipe,
                        on_progress=lambda stage, fraction, message: stages.append(stage))
    report = result.report
    assert abs(count(result.program).macs - 0.25 * count(ep).macs) <= 0.02 * 0.25 * count(ep).macs
    assert report["target"]["met"]
    assert {"sparse", "prune", "finetune", "evaluate"} <= set(stages)
    ev = report["evaluation"]
    assert ev["before"]["accuracy"] > 0.9
    assert ev["after"]["accuracy"] >= ev["after_pruning"]["accuracy"]  # recovery keeps the best checkpoint
    assert ev["after"]["accuracy"] > 0.8
    curve = report["training"]["sparse"]["loss_curve"]
    assert curve[0]["step"] == 1 and curve[-1]["step"] == 60 and all(map(lambda p: p["loss"] < 1e3, curve))
    assert report["training"]["finetune"]["curve"][0]["step"] == 0
    assert set(report["latency_ms"]["before"]) == {"1", "8"} and report["dataset"]["targets"]
    json.dumps(report)  # the report is plain JSON


def test_without_labels_recovery_distils_from_the_original(trained) -> None:
    ep, x, _ = trained
    result = run_recipe(ep, PruneConfig(ratio=0.6), Recipe(dataset=Dataset(x, None), finetune_epochs=8, device="cpu"))
    assert result.report["training"]["finetune"]["steps"] == 68  # 8 passes over 540 training rows, 64 a batch
    ev = result.report["evaluation"]
    assert "accuracy" not in ev["after"] and result.report["dataset"]["loss"] == "kl"
    assert ev["after"]["agreement"] >= ev["after_pruning"]["agreement"]


def test_what_needs_data_without_data_is_refused(trained) -> None:
    ep, x, y = trained
    for recipe, config in [(Recipe(sparse_steps=5), PruneConfig()), (Recipe(finetune_steps=5), PruneConfig()),
                           (Recipe(), PruneConfig(importance="fisher"))]:
        with pytest.raises(PruneError, match="dataset is required by"):
            run_recipe(ep, config, recipe)
    with pytest.raises(ValueError, match="rows are .* but the program takes"):
        run_recipe(ep, PruneConfig(), Recipe(dataset=Dataset(torch.randn(50, 31), None), finetune_steps=1))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunery.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_prune_command_with_a_dataset_and_a_target(trained, tmp_path: Path) -> None:
    ep, x, y = trained
    torch.export.save(ep, tmp_path / "model.pt2")
    save_dataset(tmp_path / "data.safetensors", x, y)
    proc = _cli("prune", "model.pt2", "-o", "small.pt2", "--report", "report.json", "--dataset", "data.safetensors",
                "--target-params", "0.3", "--finetune-steps", "40", "--importance", "fisher", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[finetune]" in proc.stdout and "target params" in proc.stdout and "held-out after:" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    small = load_program(tmp_path / "small.pt2")
    assert count(small).params == report["params_after"]
    assert abs(report["params_after"] - 0.3 * report["params_before"]) <= 0.02 * 0.3 * report["params_before"]
    # a dataset with NaNs: refused in one line, nothing written
    bad = x.clone()
    bad[3, 4] = float("nan")
    save_dataset(tmp_path / "bad.npz", bad, y, format="npz")
    proc = _cli("prune", "model.pt2", "-o", "bad.pt2", "--dataset", "bad.npz", "--ratio", "0.5", "--finetune-steps",
                "5", cwd=tmp_path)
    assert proc.returncode != 0 and "NaN" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.pt2").exists()


@pytest.mark.parametrize(("recipe", "match"), [
    (Recipe(held_out=1.5), "held_out must be a fraction"),
    (Recipe(batch_size=0), "batch_size must be between 1"),
    (Recipe(sparse_steps=-1), "sparse_steps must be between 0"),
    (Recipe(reg=float("nan")), "reg must be"),
    (Recipe(finetune_steps=5, finetune_epochs=1.0), "finetune_steps or finetune_epochs, not both"),
    (Recipe(target=Target("macs", 1.0)), "target macs must be a fraction"),
    (Recipe(optimizer="lion"), "optimizer must be one of sgd, adam, adamw"),
    (Recipe(distill_loss="l1"), "distill_loss must be one of kl, mse, cosine"),
    (Recipe(warmup=1.0), "warmup must be a share"),
    (Recipe(teacher_weight=1.5), "teacher_weight must be a share"),
    (Recipe(hidden_weight=-1.0), "hidden_weight must be a finite number"),
    (Recipe(clip_grad=float("inf")), "clip_grad must be"),
    (Recipe(recalibrate_batches=-1), "recalibrate_batches must not be negative"),
])
def test_bad_recipe_values_are_refused_with_their_reason(recipe: Recipe, match: str) -> None:
    dataset = Dataset(torch.randn(20, 32), None)
    with pytest.raises(PruneError, match=match):
        dataclasses.replace(recipe, dataset=dataset).validate(PruneConfig())
