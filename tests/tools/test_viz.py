"""`muxtune-viz`: plan and run pages checked structurally, and rendered in headless Chromium
(skipped where it is not installed) to a screenshot whose timeline is not blank."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from user_path import run_cli, write_job

from muxtune.compiler.compile import compile_job
from muxtune.compiler.replay import replay_plan
from muxtune.plans import Plan, save_plan
from muxtune.specs import load_job_spec
from muxtune.tools.viz import main
from muxtune.tools.viz_html import CHART_WIDTH, LABEL_WIDTH, ROW_HEIGHT


def pipeline_plan(directory: Path) -> tuple[Plan, Path]:
    job = write_job(directory, output_dir=str(directory / "out"))
    spec = load_job_spec(job, ["cluster.device=h100", "cluster.num_devices=2", "cluster.pipeline_parallel=2"])
    plan = compile_job(spec, fusion="no_fuse").plan
    return plan, save_plan(plan, directory / "plan.yaml")


def viz(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "muxtune.tools.viz", *args], capture_output=True, text=True)


def test_replay_reproduces_the_plans_predictions(tmp_path: Path) -> None:
    plan, _ = pipeline_plan(tmp_path)
    simulations = replay_plan(plan)
    assert [round(s.seconds_per_round, 6) for s in simulations] == [
        p.seconds_per_round for p in plan.predictions.phases
    ]
    assert {e.rank for s in simulations for e in s.timeline} == {0, 1}


def test_plan_page_has_a_bar_per_instruction(tmp_path: Path) -> None:
    plan, path = pipeline_plan(tmp_path)
    assert main([str(path), "-o", str(tmp_path / "plan.html")]) == 0
    page = (tmp_path / "plan.html").read_text()
    simulations = replay_plan(plan)
    assert page.count('<rect class="bar"') == sum(len(s.timeline) for s in simulations)
    assert page.count('<svg class="timeline"') == len(plan.phases)
    assert not re.search(r"<script|https?://|<link", page), "self-contained: no scripts, no network"
    for htask in plan.phases[0].htasks:
        assert f"hTask {htask.id}: {', '.join(htask.tasks)}" in page
    assert "rank 0 stream 0" in page and "rank 1 stream 0" in page
    tips = re.findall(r"<title>(rank \d [^<]*)</title>", page)
    assert any("send hTask" in tip for tip in tips) and any("backward hTask" in tip for tip in tips)
    assert page.count("<tr>") >= 1 + len(plan.phases) + 1 + len(plan.partition.subgraphs)


def test_run_page_adds_losses_step_times_and_round_times(tmp_path: Path) -> None:
    job = write_job(tmp_path)
    assert run_cli("compile", str(job), "-o", str(tmp_path / "plan.yaml")).returncode == 0
    assert run_cli("run", str(tmp_path / "plan.yaml")).returncode == 0
    done = viz(str(tmp_path / "out"), "-o", str(tmp_path / "run.html"))
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "run.html").read_text()
    names = ["sentiment", "qa", "instructions"]
    assert page.count('<polyline class="series"') == 2 * len(names), "a loss and a step-time line per task"
    assert all(f"<title>{name}</title>" in page for name in names)
    assert "Predicted against measured round time" in page
    assert page.count('<svg class="timeline"') == 3


def test_bad_sources_are_clear_errors(tmp_path: Path) -> None:
    for source, message in (
        (tmp_path / "missing.yaml", "missing.yaml"),
        (tmp_path, "run.json: not a MuxTune run record"),
    ):
        done = viz(str(source), "-o", str(tmp_path / "out.html"))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert message in done.stderr
    assert not (tmp_path / "out.html").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
def test_page_renders_a_timeline_in_chromium(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    plan, path = pipeline_plan(tmp_path)
    assert main([str(path), "-o", str(tmp_path / "plan.html")]) == 0
    shot = tmp_path / "plan.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1300,1200",
            (tmp_path / "plan.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = image_module.open(shot).convert("RGB")
    coloured = 0
    for x in range(LABEL_WIDTH + 30, LABEL_WIDTH + CHART_WIDTH, 4):
        for y in range(0, image.height, 2):
            r, g, b = image.getpixel((x, y))
            coloured += max(r, g, b) - min(r, g, b) > 60
    assert coloured > 500, "the timeline's coloured bars are on the screenshot"
    assert ROW_HEIGHT * len(plan.placement.stages) < image.height
