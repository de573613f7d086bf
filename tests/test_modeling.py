"""Model building, LoRA target checks, optimizers and the token-summed loss."""

import pytest
import torch

from conftest import TINY_SUMMARIZE, load_script
from ftkit import config as cfg, modeling, optim
from ftkit.config import ConfigError

qs = load_script("qlora_summarize")


def tiny_config(**overrides):
    return cfg.build(qs.SummarizeConfig, cfg.load_yaml_recipe(TINY_SUMMARIZE), overrides)


def test_max_length_follows_s001_lookup_order():
    from transformers import GPT2Config, PhiConfig, PretrainedConfig

    assert modeling.max_positions(GPT2Config(n_positions=256)) == 256
    assert modeling.max_positions(PhiConfig(max_position_embeddings=300)) == 300
    assert modeling.max_positions(PretrainedConfig()) == 1024


def test_lora_target_that_matches_nothing_lists_the_linear_layers():
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    model_cfg = modeling.auto_config(config)
    modeling.check_lora_targets(model_cfg, AutoModelForCausalLM, ["q_proj", "dense"])
    with pytest.raises(ConfigError, match=r"lora_target_modules: 'query_key_value' matches no module of this model "
                                          r"\(linear layers: dense, fc1, fc2, k_proj, q_proj, v_proj\)"):
        modeling.check_lora_targets(model_cfg, AutoModelForCausalLM, ["q_proj", "query_key_value"])


def test_loss_sum_matches_mean_cross_entropy_times_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    loss_sum, count = modeling.causal_lm_loss_sum(logits, labels)
    assert count.tolist() == [3, 2]
    mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert torch.allclose(loss_sum.sum() / count.sum(), mean)
    assert modeling.count_target_tokens(labels) == 5


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"])
def test_every_optimizer_steps_only_trainable_parameters(name):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    config = tiny_config(optim=name, learning_rate=1e-2, weight_decay=0.1)
    opt = optim.build_optimizer(model, config)
    assert sum(len(g["params"]) for g in opt.param_groups) == 4  # LayerNorm (2) + last Linear (2)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}  # no decay on bias / norm
    frozen, before = model[0].weight.clone(), model[2].weight.clone()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert torch.equal(model[0].weight, frozen) and not torch.equal(model[2].weight, before)


def test_scheduler_warms_up_then_decays():
    model = torch.nn.Linear(2, 2)
    config = tiny_config(learning_rate=1.0, warmup_steps=2, lr_scheduler_type="linear")
    opt = optim.build_optimizer(model, config)
    sched = optim.build_scheduler(opt, config, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
    assert optim.total_optimizer_steps(tiny_config(max_steps=-1, num_train_epochs=2.5), 4) == 10


def test_tokenizer_built_offline_round_trips_unseen_text(tiny_tokenizer):
    text = "#Person1#: Zebra café ünïcode 123?"
    assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == "<|endoftext|>"


def test_4bit_lora_model_trains_only_adapters(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    config = tiny_config(output_dir=str(tmp_path))
    model_cfg = modeling.auto_config(config)
    model_cfg.vocab_size = len(tiny_tokenizer)
    AutoModelForCausalLM.from_config(model_cfg).save_pretrained(tmp_path / "base")
    model = modeling.load_pretrained(AutoModelForCausalLM, str(tmp_path / "base"), config)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    model = modeling.add_lora(model, config, "CAUSAL_LM")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainable_count, total = modeling.parameter_counts(model)
    assert 0 < trainable_count < total
