"""param_groups routes by what a parameter is: exactly the transformer block matrices go to nsisa."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pisa_zero import PISA, param_groups


def gpt2(tied=True):
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, tie_word_embeddings=tied)
    return GPT2LMHeadModel(cfg)


def llama(tied=False):
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_block_matrices_only(tied):
    model = gpt2(tied)
    matrices, others = param_groups(model)
    expected = {n for n, _ in model.named_parameters() if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))}
    assert names(model, matrices) == expected and matrices["preconditioner"] == "nsisa"
    assert others["preconditioner"] == "adamw"
    rest = names(model, others)
    assert "transformer.wte.weight" in rest and "transformer.wpe.weight" in rest
    assert not tied or "lm_head.weight" in rest  # tied: the same tensor as wte
    n_params = len({id(p) for p in model.parameters()})
    assert len(matrices["params"]) + len(others["params"]) == n_params


@pytest.mark.parametrize("tied", [True, False])
def test_llama_block_matrices_only(tied):
    model = llama(tied)
    matrices, others = param_groups(model, other_preconditioner="sisa")
    suffixes = (
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    )
    assert names(model, matrices) == {n for n, _ in model.named_parameters() if n.endswith(suffixes)}
    rest = names(model, others)
    assert "model.embed_tokens.weight" in rest and "lm_head.weight" in rest
    assert others["preconditioner"] == "sisa" and "lr" not in others


def test_zero_init_shapes_are_read_from_ds_shape():
    model = gpt2()
    for p in model.parameters():  # what deepspeed.zero.Init leaves behind: 1-D partitions with ds_shape
        p.ds_shape = p.shape
        p.data = p.data.reshape(-1)[:1].clone()
    matrices, _ = param_groups(model)
    assert len(matrices["params"]) == 2 * 4


def test_groups_train_with_pisa():
    model = gpt2()
    opt = PISA(param_groups(model, matrix_options=dict(sigma=30.0, rho=100.0)))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
