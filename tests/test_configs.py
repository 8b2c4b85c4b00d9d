"""Every config composes, converts to the dataclass schema, and typos fail at composition."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from adalora_lab.schema import RunConfig, build_method_config
from helpers import CONF, compose_run, options

CASES = (
    [[f"model={m}"] + (["model.path=bert-base-uncased"] if m == "hub" else [])
     + (["task=planted_rank"] if m == "resmlp" else []) for m in options("model")]
    + [[f"task={t}"] + (["model=resmlp"] if t == "planted_rank" else []) for t in options("task")]
    + [[f"method={m}"] for m in options("method")]
    + [[f"optim={o}"] for o in options("optim")]
    + [[f"logger={lg}"] for lg in options("logger")]
    + [[f"debug={d}"] for d in options("debug")]
    + [[f"experiment={e}"] for e in options("experiment")]
)


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: " ".join(o))
def test_every_config_composes(overrides):
    run = compose_run(overrides)
    assert isinstance(run, RunConfig)
    # the method converts to a library config for a plausible number of steps
    lib = build_method_config(run.method, run.model, total_steps=100)
    assert (lib is None) == (run.method.kind == "full")


@pytest.mark.parametrize("method", options("method"))
def test_budget_key_on_every_method(method):
    """`method=lora,adalora method.target_r=2,4` sweeps need target_r on every method."""
    run = compose_run([f"method={method}", "method.target_r=4"])
    assert run.method.target_r == 4


def test_seed_zero_is_kept():
    assert compose_run(["seed=0"]).seed == 0


@pytest.mark.parametrize("bad", ["method.target_rnk=4", "method.target_r=four", "optim.lr=fast", "epochs=[1]",
                                 "method=adalora_typo", "task.max_lenght=3"])
def test_typos_fail_at_composition(bad):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        compose_run([bad])


def test_launcher_presets_compose():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for launcher in ("joblib", "parallel", "slurm"):
            cfg = compose(config_name="train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
            assert "launcher" in cfg.hydra
    assert cfg.hydra.launcher.array_parallelism == 64  # the slurm preset's own knob


def test_fractional_schedule_never_invalid():
    """tinit/tfinal as fractions: changing the length of training keeps the schedule valid."""
    run = compose_run(["method=adalora"])
    for steps in (10, 100, 10_000):
        lib = build_method_config(run.method, run.model, total_steps=steps)
        assert lib.tinit + lib.tfinal < steps
        assert lib.init_r == round(1.5 * run.method.target_r)


def test_help_names_every_option_and_no_schema():
    """`train.py --help` lists every option of every group (so a new YAML file must be documented there), no
    internal `*_schema` entry, and examples."""
    import yaml

    text = yaml.safe_load((CONF / "hydra" / "help" / "adalora.yaml").read_text())["template"]
    for group in ("model", "task", "method", "optim", "logger", "paths", "experiment", "debug", "hydra/launcher"):
        for option in options(group):
            assert re.search(rf"\b{re.escape(option)}\b", text), f"{group}={option} is missing from --help"
    assert "_schema" not in text and "== Examples ==" in text


@pytest.mark.parametrize("method, lr, gamma", [
    ("lora", 3e-4, None), ("adalora", 1e-3, 0.3), ("adalora_no_orth", 1e-3, 0.0), ("svd_lora", 1e-3, 0.3),
    ("sora_budget", 3e-4, None), ("increlora", 1e-3, None), ("sora", 1e-3, None), ("adalora_lambda_lr", 1e-3, 0.3)])
def test_glue_converged_runs_each_method_at_its_chosen_setting_on_any_task(method, lr, gamma):
    """A held-out task (CoLA) takes the settings chosen on MRPC; an ablation keeps the piece it changes."""
    cfg = compose_run(["experiment=glue_converged", "task=cola", f"method={method}"])
    assert cfg.optim.lr == lr and cfg.method.orth_reg_weight == gamma
    given = compose_run(["experiment=glue_converged", "task=cola", f"method={method}", "optim.lr=0.01",
                         "method.orth_reg_weight=0.2"])
    assert given.optim.lr == 0.01 and given.method.orth_reg_weight == 0.2  # the command line wins


@pytest.mark.parametrize("method, delta_t", [("adalora", 1), ("sora_budget", 1), ("increlora", None)])
def test_glue_converged_leaves_increlora_interval_to_grow_until(method, delta_t):
    """AdaLoRA's one-step masking interval is the row's; IncreLoRA's interval follows from its grow_until
    (growth spread over the same window as AdaLoRA's pruning), unless given."""
    cfg = compose_run(["experiment=glue_converged", "task=mrpc", f"method={method}"])
    assert cfg.method.delta_t == delta_t
    assert compose_run(["experiment=glue_converged", "task=mrpc", f"method={method}",
                        "method.delta_t=7"]).method.delta_t == 7


@pytest.mark.parametrize("task, alpha", [("sst2", 16), ("mrpc", 32), ("rte", 32), ("cola", 32)])
def test_glue_converged_takes_a_task_rows_alpha_for_every_method(task, alpha):
    """A protocol row may carry the authors' lora_alpha for its task (SST-2: 16); the rest keep 32, and the
    command line still wins."""
    for method in ("lora", "adalora"):
        assert compose_run(["experiment=glue_converged", f"task={task}", f"method={method}"]).method.lora_alpha == alpha
    assert compose_run(["experiment=glue_converged", f"task={task}", "method.lora_alpha=8"]).method.lora_alpha == 8
