"""The model's device and dtype handling without a GPU, and patch dropout.

Meta device: a model built on meta and fed host tensors must move them itself (the towers' entry does); any tensor
made on the CPU inside a forward would meet meta parameters and raise. bf16: DeepSpeed casts parameters to bf16 but
not the inputs; the towers cast them (before the fix: "Input type (float) and bias/weight type (BFloat16) should be
the same")."""

from __future__ import annotations

import pytest
import torch

from towerlab.models import ContrastiveModel
from towerlab.models.towers import PatchDropout
from towerlab.train.recipe import load_recipe

META = torch.device("meta")


@pytest.fixture(scope="module")
def recipe(repo_root):
    return load_recipe(repo_root / "recipes" / "debug.yaml", ["model.signal.dim=5", "data.source=synthetic3",
                                                                "loss.name=symile", "loss.modalities=[image,text,signal]"])


def _inputs(recipe, n=4):
    v, t = recipe.model.vision, recipe.model.text
    return {"image": torch.randn(n, 3, v.image_size, v.image_size),
            "text": torch.randint(1, t.vocab_size, (n, t.context_length)),
            "signal": torch.randn(n, recipe.model.signal.dim)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_model_on_meta_moves_host_inputs_and_backpropagates(recipe, dtype, p):
    recipe.model.vision.patch_dropout = p
    with torch.device(META):
        model = ContrastiveModel(recipe.model).to(dtype)
    out = model(_inputs(recipe))
    assert all(f.device == META and f.dtype == torch.float32 for f in out.values())  # normalised in fp32
    sum(f.sum() for f in out.values()).backward()
    assert all(p.grad is not None and p.grad.device == META and p.grad.dtype == dtype
               for p in model.towers.parameters() if p.requires_grad)


def test_bf16_model_takes_fp32_images_on_cpu(recipe):
    recipe.model.vision.patch_dropout = 0.0
    torch.manual_seed(0)
    model = ContrastiveModel(recipe.model)
    x = _inputs(recipe)
    ref = model(x)
    out = model.to(torch.bfloat16)(x)
    for m in ref:
        assert out[m].dtype == torch.float32
        # bf16 weights and activations: 8 bits of mantissa, features of unit norm
        torch.testing.assert_close(out[m], ref[m], atol=0.05, rtol=0)


def test_patch_dropout_keeps_a_random_fraction_in_training_only():
    x = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    drop = PatchDropout(0.5)
    kept = drop.train()(x)
    assert kept.shape == (2, 5, 3)
    for b in range(2):  # whole tokens of the same image, no repeats
        rows = {tuple(r) for r in kept[b].tolist()}
        assert len(rows) == 5 and rows <= {tuple(r) for r in x[b].tolist()}
    assert not torch.equal(drop(x), drop(x)) or not torch.equal(drop(x), drop(x))  # random per call
    assert torch.equal(drop.eval()(x), x)
    assert PatchDropout(0.99).train()(x).shape == (2, 1, 3)  # at least one patch
    with pytest.raises(ValueError, match="patch_dropout"):
        PatchDropout(1.0)


def test_vision_tower_with_patch_dropout_sees_fewer_tokens_and_eval_sees_all(recipe):
    recipe.model.vision.patch_dropout = 0.75
    model = ContrastiveModel(recipe.model)
    lengths = []
    model.towers["image"].transformer.blocks[0].register_forward_hook(lambda m, a, o: lengths.append(o.shape[1]))
    x = _inputs(recipe)["image"]
    grid = (recipe.model.vision.image_size // recipe.model.vision.patch_size) ** 2
    model.train().encode("image", x)
    model.eval().encode("image", x)
    assert lengths == [1 + int(grid * 0.25), 1 + grid]
    # with p=0 the tower is the same function as before (positions added, class token first)
    recipe.model.vision.patch_dropout = 0.0
    torch.manual_seed(1)
    a = ContrastiveModel(recipe.model).train()
    torch.testing.assert_close(a.encode("image", x), a.eval().encode("image", x))
