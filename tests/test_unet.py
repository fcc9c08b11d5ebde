"""U-Net score heads (unet.py, model.head = unet): task isolation, shapes, spec round trip, a short real training."""

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import cdmtransfer
from cdmtransfer.config import load_config
from cdmtransfer.errors import ConfigError
from cdmtransfer.models import MLPEncoder, ScoreModel, build_model, head_options, model_spec
from cdmtransfer.unet import UNetHeads

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def unet_model(K=3, shape=(8, 8), channels=1, sees_y=False, **config):
    d_x = channels * shape[0] * shape[1]
    return ScoreModel(MLPEncoder(d_x, 3, 8, 1), K, d_x, 8, 1, 8, head="unet", image_shape=shape,
                      parametrization="edm", head_config={"sees_y": sees_y, **config})


@pytest.mark.parametrize("shape", [(8, 8), (28, 28), (6, 5)])
def test_tasks_are_independent_and_gradients_stay_in_their_task(shape):
    torch.manual_seed(0)
    K, B = 3, 4
    heads = unet_model(K, shape, sees_y=True).heads
    d = shape[0] * shape[1]
    x, cond, y = torch.randn(K, B, d), torch.randn(K, B, 3 + 8), torch.randn(K, B, d)
    base = heads(x, cond, y)
    for name, a in (("x", x), ("cond", cond), ("y", y)):  # change task 1's input only: 0 and 2 are bit-identical
        moved = a.clone()
        moved[1] = torch.randn_like(moved[1])
        out = heads(*[moved if b is a else b for b in (x, cond, y)])
        assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2]), name
        assert not torch.allclose(out[1], base[1]), name
    heads(x, cond, y)[0].pow(2).sum().backward()  # task 0's loss reaches no other task's weights
    for name, p in heads.named_parameters():
        g = p.grad.reshape(K, -1)  # every parameter has the task on its leading axis (grouped channels or [K, ...])
        assert g[1:].abs().sum() == 0, name
        assert g[0].abs().sum() > 0, name


def test_task_k_block_of_every_tensor_is_a_whole_single_task_head():
    """Each head tensor is K equal blocks along dim 0 (what adapt.head_init = source copies): block k loaded into a
    one-task model reproduces head k exactly."""
    torch.manual_seed(1)
    many, one = unet_model(3, (28, 28), sees_y=True).heads, unet_model(1, (28, 28), sees_y=True).heads
    state = {name: t.reshape(3, -1, *t.shape[1:])[2].reshape(one.state_dict()[name].shape)
             for name, t in many.state_dict().items()}
    one.load_state_dict(state)
    x, cond, y = torch.randn(3, 2, 784), torch.randn(3, 2, 11), torch.randn(3, 2, 784)
    assert torch.allclose(one(x[2:], cond[2:], y[2:])[0], many(x, cond, y)[2], atol=1e-5)


def test_groupnorm_groups_never_straddle_tasks():
    heads = unet_model(K=4, shape=(28, 28), mults=[1, 3]).heads  # 8 and 24 channels per task
    for module in heads.modules():
        if isinstance(module, torch.nn.GroupNorm):
            assert module.num_channels % module.num_groups == 0
            per_task = module.num_channels // 4
            assert per_task % (module.num_channels // module.num_groups) == 0  # groups tile each task's block


@pytest.mark.parametrize("shape,sides,patch", [((8, 8), [(8, 8), (4, 4), (2, 2)], 1),
                                               ((28, 28), [(14, 14), (7, 7), (4, 4)], 2),
                                               ((6, 5), [(6, 5), (3, 3), (2, 2)], 1),
                                               ((5, 5), [(3, 3), (2, 2)], 2)])
def test_output_shape_and_levels_by_size(shape, sides, patch):
    config = {"patch": 2} if shape == (5, 5) else {}  # an explicit patch on odd sides pads and crops
    model = unet_model(2, shape, channels=2, **config)
    d_x = 2 * shape[0] * shape[1]
    x, y, t = torch.randn(2, 3, d_x), torch.randn(2, 3, d_x), torch.rand(2, 3) + 0.05
    assert model(x, y, t).shape == (2, 3, d_x)
    assert model.heads.sides == sides and model.heads.patch == patch


def test_zero_out_starts_at_zero_and_cond_image_is_required_when_built_for_it():
    heads = unet_model(2, zero_out=True).heads
    assert torch.equal(heads(torch.randn(2, 3, 64), torch.randn(2, 3, 11)), torch.zeros(2, 3, 64))
    seeing = unet_model(2, sees_y=True).heads
    with pytest.raises(ValueError, match="condition image"):
        seeing(torch.randn(2, 3, 64), torch.randn(2, 3, 11))
    with pytest.raises(ValueError, match="not an image of x's size"):
        ScoreModel(MLPEncoder(10, 3, 8, 1), 1, 64, 8, 1, 8, head="unet", image_shape=(8, 8),
                   head_config={"sees_y": True})


@pytest.mark.parametrize("sees_y", [False, True])
def test_spec_round_trip_through_model_spec_and_build_model(sees_y):
    model = unet_model(3, (28, 28), sees_y=sees_y, mults=[1, 2], zero_out=False)
    spec = json.loads(json.dumps(model_spec(model)))  # what a checkpoint's meta.json holds
    assert spec["head"] == "unet" and spec["image_shape"] == [1, 28, 28]
    assert spec["head_config"] == {"mults": [1, 2], "patch": 2, "zero_out": False, "sees_y": sees_y}
    again = build_model(spec)
    again.load_state_dict(model.state_dict())
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    x, code, t = torch.randn(3, 2, 784), torch.randn(3, 2, 3), torch.rand(3, 2) + 0.05
    cond = torch.cat([code, model.time(t)], dim=-1)
    y = torch.randn(3, 2, 784) if sees_y else None
    assert torch.equal(again.heads(x, cond, y), model.heads(x, cond, y))


def test_head_options_from_the_recipe():
    cfg = load_config(None, ["model.head=unet", "model.unet_mults=[1,2]"])
    assert head_options(cfg.model, (8, 8))["head_config"] == {"mults": [1, 2], "patch": 0, "zero_out": False,
                                                             "sees_y": False}
    with pytest.raises(ConfigError, match="needs image data"):
        head_options(cfg.model, None)
    seeing = head_options(load_config(None, ["model.head=unet", "model.head_sees_y=true"]).model, (8, 8))
    assert seeing["head_config"]["sees_y"] is True
    with pytest.raises(ConfigError, match="head_sees_y needs model.head = unet"):
        head_options(load_config(None, ["model.head=conv", "model.head_sees_y=true"]).model, (8, 8))
    with pytest.raises(ConfigError, match="unet_mults"):
        head_options(load_config(None, ["model.head=unet", "model.unet_mults=[]"]).model, (8, 8))


def test_a_head_that_sees_y_gets_y_itself_in_training_and_sampling():
    """With head_sees_y, ε̂ depends on y beyond the code h(y): a constant encoder leaves y as the only route, and the
    sampler (metrics.conditional_samples) must pass it too."""
    from cdmtransfer.diffusion import OUProcess
    from cdmtransfer.metrics import conditional_samples

    torch.manual_seed(2)
    model = unet_model(1, sees_y=True)
    for p in model.encoder.parameters():
        torch.nn.init.zeros_(p)  # h(y) = 0 for every y
    x, t = torch.randn(1, 3, 64), torch.rand(1, 3) + 0.05
    y1, y2 = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    assert not torch.allclose(model(x, y1, t), model(x, y2, t))  # forward passes y to the heads
    code = model.encoder(y1)
    assert torch.equal(model.eps_from_code(x, code, t, y1), model(x, y1, t))
    gen = torch.Generator().manual_seed(0)
    a = conditional_samples(model, y1[0], 1, OUProcess(1e-3, 5.0), 4, "sde", torch.Generator().manual_seed(0))
    b = conditional_samples(model, y2[0], 1, OUProcess(1e-3, 5.0), 4, "sde", gen)
    assert a.shape == (3, 1, 64) and not torch.allclose(a, b)  # same noise, different y: different samples


def test_short_pretrain_on_digits_decreases_the_dsm_loss(store):
    sets = ["model.head=unet", "model.head_width=8", "model.head_depth=1", "model.unet_mults=[1,2]",
            "suite.n=64", "pretrain.steps=40", "pretrain.batch_size=16", "pretrain.log_every=10",
            "pretrain.warmup_steps=5", "pretrain.lr=2e-3",
            "model.linear_mean=false", "model.encoder_linear=false"]  # from a random start: the U-Net must learn
    pre = cdmtransfer.pretrain(str(RECIPES / "digits-denoise.yaml"), sets)
    history = MlflowClient(f"sqlite:///{store}/mlflow.db").get_metric_history(pre.run_id, "loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    meta = json.loads((pre.paths["model"] / "meta.json").read_text())
    assert meta["model"]["head"] == "unet" and meta["model"]["K"] == 9
