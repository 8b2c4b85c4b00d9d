"""Config validation: every bad value raises ConfigError naming the field."""

from __future__ import annotations

import warnings

import pytest

from adalora import AdaLoRAConfig, ConfigError, LoRAConfig, RankAllocator, inject_adapters

OK = dict(init_r=12, target_r=8, target_modules=["query", "value"], tinit=10, tfinal=20, delta_t=5, total_steps=200)


def ada(**kw):
    return AdaLoRAConfig(**{**OK, **kw})


@pytest.mark.parametrize("kw, field", [
    (dict(tinit=100, tfinal=100), "tinit"),
    (dict(tinit=150, tfinal=60), "total_steps"),
    (dict(tinit=0, tfinal=0, total_steps=0), "total_steps"),
    (dict(target_r=13), "target_r"),
    (dict(target_r=0), "target_r"),
    (dict(init_r=0, target_r=0), "init_r"),
    (dict(delta_t=0), "delta_t"),
    (dict(beta1=1.0), "beta1"),
    (dict(beta2=-0.1), "beta2"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules=""), "target_modules"),
    (dict(target_modules=["query", ""]), "target_modules"),
    (dict(score="fisher"), "score"),
    (dict(adapter="lora", score="magnitude"), "score"),
    (dict(adapter="dora"), "adapter"),
    (dict(orth_reg_form="squared"), "orth_reg_form"),
    (dict(orth_reg_weight=-1.0), "orth_reg_weight"),
    (dict(tinit=-1), "tinit"),
    (dict(modules_to_save="classifier"), "modules_to_save"),
    (dict(rank_pattern={"query": -1}), "rank_pattern"),
])
def test_invalid_adalora_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field) as exc:
        ada(**kw)
    assert "Fix:" in str(exc.value)
    assert isinstance(exc.value, ValueError)  # callers catching ValueError still work


def test_tinit_tfinal_message_says_why():
    with pytest.raises(ConfigError, match=r"tinit \+ tfinal = 200 must be < total_steps = 200"):
        ada(tinit=150, tfinal=50)
    ada(tinit=150, tfinal=49)  # one step of decrease is enough
    AdaLoRAConfig(**{**OK, "prune": False, "tinit": 150, "tfinal": 50})  # SVD-LoRA has no schedule


@pytest.mark.parametrize("kw, field", [
    (dict(r=0), "r"),
    (dict(r=2.5), "r"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(target_modules=[]), "target_modules"),
])
def test_invalid_lora_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"LoRAConfig\.{field}="):
        LoRAConfig(**kw)


def test_valid_configs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = ada()
        lc = LoRAConfig(r=4, target_modules="encoder.*query")
    assert c.r == 12 and lc.init_r == 4
    assert AdaLoRAConfig().score == "ipt" and AdaLoRAConfig().total_steps is None


def test_target_equal_init_warns():
    with pytest.warns(UserWarning, match="nothing to prune"):
        ada(target_r=12)


def test_allocator_needs_total_steps_and_adaloraconfig(make_mlp):
    cfg = AdaLoRAConfig(init_r=4, target_r=2, target_modules=["0", "2"])
    adapters = inject_adapters(make_mlp(), cfg)
    with pytest.raises(ConfigError, match="total_steps"):
        RankAllocator(adapters, cfg)
    with pytest.raises(ConfigError, match="AdaLoRAConfig"):
        RankAllocator(adapters, LoRAConfig(r=4, target_modules=["0", "2"]))
    with pytest.raises(ConfigError, match="adapter='lora'"):  # SVD adapters with a prune-LoRA config
        RankAllocator(adapters, AdaLoRAConfig(init_r=4, target_r=2, target_modules=["0", "2"], total_steps=10,
                                              adapter="lora"))
    with pytest.raises(ConfigError, match="no adapters"):
        RankAllocator({}, AdaLoRAConfig(init_r=4, target_r=2, total_steps=10))
